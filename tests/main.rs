mod common;
mod docs;
mod run;
