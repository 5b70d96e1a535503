mod common;
mod control;
mod docs;
mod init;
mod lifecycle;
mod listen;
mod regress;
mod run;
