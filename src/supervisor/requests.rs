//! Control requests (SPEC §6), as `Supervisor` methods: each request
//! becomes a deploy, a rollback, a status answer or a stop, and a
//! deploy's callers hear how it went.

use std::rc::Rc;
use std::time::Instant;

use rustix::event::PollFlags;

use super::{Origin, Supervisor, Target};
use crate::control::{ClientId, Token};
use crate::protocol::{Request, StatusFormat};

impl Supervisor {
    pub(super) fn on_control(&mut self, token: Token, flags: PollFlags, now: Instant) {
        let Some(c) = self.control.as_mut() else {
            return;
        };
        let requests = c.on_ready(token, flags, now);
        for (id, req) in requests {
            self.on_request(id, req, now);
        }
    }

    fn on_request(&mut self, id: ClientId, req: Request, now: Instant) {
        match req {
            Request::Deploy(command) => {
                let target = command.map_or(Target::Current, |c| Target::Command(Rc::from(c)));
                self.request_deploy(target, Origin::Control, Some(id), now);
            }
            Request::Rollback => {
                self.request_deploy(Target::Rollback, Origin::Control, Some(id), now)
            }
            Request::Status(format) => {
                let body = super::status::render(self, format, now);
                let (healthy, verdict) = super::status::verdict(self);
                if let Some(c) = self.control.as_mut() {
                    if let Some(body) = &body {
                        c.data(id, body);
                    }
                    match format {
                        StatusFormat::Check | StatusFormat::JsonCheck => {
                            c.finish(id, healthy, &verdict)
                        }
                        _ => c.finish(id, true, ""),
                    }
                }
            }
            Request::Stop => {
                if let Some(c) = self.control.as_mut() {
                    c.progress(id, "stopping");
                }
                self.begin_stop(super::StopCause::Control, now);
                if let Some(s) = self.stop.as_mut() {
                    let control = self.control.as_ref();
                    s.waiters.retain(|&w| control.is_some_and(|c| c.waiting(w)));
                    s.waiters.push(id);
                }
            }
        }
    }

    pub(super) fn tell(&mut self, id: ClientId, line: &str) {
        if let Some(c) = self.control.as_mut() {
            c.progress(id, line);
        }
    }

    pub(super) fn conclude(&mut self, waiters: Vec<ClientId>, ok: bool, line: &str) {
        if let Some(c) = self.control.as_mut() {
            for id in waiters {
                c.finish(id, ok, line);
            }
        }
    }
}
