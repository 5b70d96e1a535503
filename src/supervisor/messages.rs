//! What workers say on their generation's notify socket (SPEC §4):
//! READY=1 promotes, STOPPING=1 fails a deploy or replaces the active
//! generation, EXTEND_TIMEOUT_USEC= moves a deadline; the rest is logged.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use super::{BACKOFF_MIN, BACKOFF_RESET, Origin, Supervisor, Target};
use crate::cli::format_duration;
use crate::generation::{Exit, State};
use crate::notify::{self, Event, Message};
use crate::{debug, info, warn};

impl Supervisor {
    /// Act on each datagram before reading the next, and return to poll
    /// after a bounded number: level-triggered poll brings us back, and a
    /// worker flooding its socket neither grows our memory nor starves
    /// signals and the control socket (SPEC §4).
    pub(super) fn on_notify(&mut self, n: u64, fd: RawFd, now: Instant) {
        let mut events = Vec::new();
        for _ in 0..notify::DATAGRAMS_PER_WAKEUP {
            let more = match self.gen_mut(n).and_then(|g| g.notify.as_mut()) {
                Some(ns) => ns.on_readable(fd, now, &mut events),
                None => false,
            };
            for e in events.drain(..) {
                self.on_notify_event(n, e, now);
            }
            if !more {
                break;
            }
        }
    }

    pub(super) fn on_notify_event(&mut self, n: u64, e: Event, now: Instant) {
        let is_active = self.active == Some(n);
        let stopping = self.stop.is_some();
        // A stop's deadline is the last word: no extension goes past it.
        let stop_deadline = self.stop.as_ref().map(|s| s.deadline);
        let Some(g) = self.gen_mut(n) else { return };
        match e {
            Event::Message(Message::Ready) => self.promote(n, now),
            Event::Message(Message::Status(s)) => {
                debug!("{} STATUS={}", g.tag(), crate::log::printable(&s));
                g.status_text = Some(s);
            }
            Event::Message(Message::Stopping) => {
                if g.leaving {
                    return;
                }
                g.leaving = true;
                info!("{} is leaving on its own (STOPPING=1)", g.tag());
                if g.state == State::Starting && !stopping {
                    // Going before it ever served: the deploy has failed,
                    // now rather than at the ready timeout.
                    let why = "sent STOPPING=1 before READY=1".to_string();
                    return self.fail_deploy(n, why, Exit::Code(1), now);
                }
                let young = g
                    .ready_at
                    .is_some_and(|t| now.saturating_duration_since(t) < BACKOFF_RESET);
                let tag = g.tag();
                if is_active && g.state == State::Ready {
                    if young && self.deploy.is_none() {
                        let wait = self.take_backoff();
                        self.replace_at = Some(now + wait);
                        info!(
                            "{tag} was ready less than {} ago; replacing it in {}",
                            format_duration(BACKOFF_RESET),
                            format_duration(wait)
                        );
                    } else {
                        if !young {
                            self.backoff = BACKOFF_MIN;
                        }
                        self.request_deploy(Target::Current, Origin::Replace, None, now);
                    }
                }
            }
            Event::Message(Message::ExtendTimeout(usec)) => {
                // Only a deadline that exists moves (`--ready-timeout 0`
                // stays forever), and never a failed generation's kill.
                if matches!(g.state, State::Starting | State::Draining)
                    && g.running()
                    && g.deadline.is_some()
                {
                    let asked = now + Duration::from_micros(usec);
                    g.deadline = Some(stop_deadline.map_or(asked, |d| asked.min(d)));
                    g.extended = true;
                    if g.may_log_notify() {
                        info!(
                            "{} extended its {} deadline by {}",
                            g.tag(),
                            g.state.name(),
                            format_duration(Duration::from_micros(usec))
                        );
                    }
                }
            }
            Event::Message(Message::Errno(errno)) => {
                if g.may_log_notify() {
                    let text = crate::error::os_message(&std::io::Error::from_raw_os_error(errno));
                    info!("{} reported ERRNO={errno} ({text})", g.tag());
                }
            }
            Event::Message(Message::Ignored(line)) => debug!(
                "{} sent {} (ignored)",
                g.tag(),
                crate::log::printable(&line)
            ),
            Event::Malformed(why) => {
                if !g.noisy {
                    g.noisy = true;
                    warn!(
                        "{} bad notify message dropped: {} (not logged again for this generation)",
                        g.tag(),
                        crate::log::printable(&why)
                    );
                }
            }
            Event::IdleClosed(count) => info!(
                "{} closed {count} notify connection(s) silent for {}s",
                g.tag(),
                crate::notify::STREAM_IDLE.as_secs()
            ),
            Event::Denied(uid) => {
                if !g.refused_logged {
                    g.refused_logged = true;
                    warn!(
                        "{} notify message from uid {uid} refused (not logged again for this generation)",
                        g.tag()
                    );
                }
            }
        }
    }
}
