mod common;
mod control;
mod docs;
mod run;
