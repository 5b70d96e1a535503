mod common;
mod control;
mod docs;
mod init;
mod regress;
mod run;
