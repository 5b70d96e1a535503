//! Listeners a worker shut down: shutdown(2) on a worker's fd 3
//! disconnects the one socket every generation shares, so the supervisor
//! watches each listener for a hang-up and listens again (SPEC §3: the
//! sockets never close while the supervisor lives).

use std::time::{Duration, Instant};

use rustix::event::PollFlags;

use super::Supervisor;
use crate::cli::format_duration;
use crate::listen;
use crate::{debug, warn};

/// How often a TCP listener whose port another process took is tried again.
const RELISTEN_EVERY: Duration = Duration::from_secs(1);

impl Supervisor {
    /// Poll saw listener `i` hang up (HUP for TCP, RDHUP for unix): a
    /// worker shut it down (shutdown(2) on its fd 3 disconnects the socket
    /// for every generation). Listen again at once, or say that
    /// connections to it are refused. Either way poll stops reporting it,
    /// so this cannot spin.
    pub(super) fn on_listener_hang_up(&mut self, i: usize, flags: PollFlags, now: Instant) {
        let backlog = self.cfg.backlog;
        let Some(l) = self.listeners.get_mut(i) else {
            return;
        };
        let fd = listen::FIRST_FD + i as i32;
        if !flags.intersects(PollFlags::HUP | PollFlags::RDHUP) {
            debug!(
                "listener {} (fd {fd}) reports {flags:?}; no longer watched",
                l.display
            );
            l.unwatched = true;
            return;
        }
        match l.listen_again(backlog) {
            Ok(()) => warn!(
                "listener {} (fd {fd}) was shut down by a worker (shutdown(2) on it); listening again",
                l.display
            ),
            Err(e) => {
                l.unwatched = true;
                l.dead = true;
                // A TCP port another process took may come free again.
                let retry = if l.tcp_addr.is_some() {
                    self.relisten_at = Some(now + RELISTEN_EVERY);
                    format!("; trying again every {}", format_duration(RELISTEN_EVERY))
                } else {
                    String::new()
                };
                warn!(
                    "listener {} (fd {fd}) was shut down by a worker (shutdown(2) on it) and cannot listen again: {e}; connections to it are refused{retry}",
                    l.display
                );
            }
        }
    }

    /// `relisten_at`: try the TCP listeners that could not listen again.
    pub(super) fn relisten(&mut self, now: Instant) {
        self.relisten_at = None;
        let backlog = self.cfg.backlog;
        for (i, l) in self.listeners.iter_mut().enumerate() {
            if !l.dead || l.tcp_addr.is_none() {
                continue;
            }
            if l.listen_again(backlog).is_ok() {
                (l.dead, l.unwatched) = (false, false);
                let fd = listen::FIRST_FD + i as i32;
                warn!("listener {} (fd {fd}) listens again", l.display);
            } else {
                self.relisten_at = Some(now + RELISTEN_EVERY);
            }
        }
    }
}
