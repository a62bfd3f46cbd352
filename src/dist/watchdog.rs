//! A watchdog for collectives that run on a device. An NCCL collective returns to the host at
//! once and completes on the GPU later; when a peer dies or stalls it never completes, and the
//! host waits forever in the next read of a device result. The watchdog thread follows each
//! collective (by a completion test the transport gives, an event query for NCCL) and, when the
//! oldest one has not completed within the run's timeout, calls the expiry action with what
//! hangs: a GPU run logs it and exits, so that the launcher stops the other ranks and names this
//! one, instead of every rank hanging.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Whether a watched operation has completed.
pub type Done = Box<dyn Fn() -> bool + Send>;

/// What the watchdog does when an operation expires; it gets a description of it.
pub type Expire = Box<dyn Fn(String) + Send>;

struct Watched {
    what: String,
    since: Instant,
    done: Done,
}

struct State {
    queue: VecDeque<Watched>,
    stopped: bool,
}

/// Follows operations in the order they were started (a stream completes them in that order).
pub struct Watchdog {
    shared: Arc<(Mutex<State>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// A watchdog thread that checks every `poll` and calls `expire` once, for the first
    /// operation still incomplete `timeout` after it started.
    pub fn new(timeout: Duration, poll: Duration, expire: Expire) -> Self {
        let shared = Arc::new((
            Mutex::new(State {
                queue: VecDeque::new(),
                stopped: false,
            }),
            Condvar::new(),
        ));
        let inner = shared.clone();
        let thread = std::thread::Builder::new()
            .name("packsft-watchdog".into())
            .spawn(move || {
                let (lock, cv) = &*inner;
                let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if st.stopped {
                        return;
                    }
                    while st.queue.front().is_some_and(|w| (w.done)()) {
                        st.queue.pop_front();
                    }
                    if let Some(w) = st.queue.front() {
                        let waited = w.since.elapsed();
                        if waited > timeout {
                            let msg = format!(
                                "{} has not completed after {:.0} s (dist.timeout_s {}): a rank \
                                 died or hangs",
                                w.what,
                                waited.as_secs_f64(),
                                timeout.as_secs()
                            );
                            st.queue.clear();
                            drop(st);
                            expire(msg);
                            return;
                        }
                    }
                    st = cv
                        .wait_timeout(st, poll)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            })
            .expect("the watchdog thread starts");
        Self {
            shared,
            thread: Some(thread),
        }
    }

    /// Follows an operation that just started, described by `what`.
    pub fn watch(&self, what: impl Into<String>, done: Done) {
        let (lock, _) = &*self.shared;
        lock.lock()
            .unwrap_or_else(|e| e.into_inner())
            .queue
            .push_back(Watched {
                what: what.into(),
                since: Instant::now(),
                done,
            });
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, cv) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).stopped = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn recorder() -> (Arc<Mutex<Vec<String>>>, Expire) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (seen, Box::new(move |m| s.lock().unwrap().push(m)))
    }

    #[test]
    fn an_operation_that_never_completes_expires_once_naming_it() {
        let (seen, expire) = recorder();
        let w = Watchdog::new(
            Duration::from_millis(100),
            Duration::from_millis(10),
            expire,
        );
        w.watch("rank 1: NCCL all-reduce of 4 elements", Box::new(|| false));
        w.watch("rank 1: NCCL broadcast", Box::new(|| false));
        std::thread::sleep(Duration::from_millis(600));
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(
            seen[0].starts_with("rank 1: NCCL all-reduce of 4 elements has not completed"),
            "{}",
            seen[0]
        );
    }

    #[test]
    fn completed_operations_never_expire() {
        let (seen, expire) = recorder();
        let w = Watchdog::new(
            Duration::from_millis(100),
            Duration::from_millis(10),
            expire,
        );
        let finished = Arc::new(AtomicBool::new(false));
        let f = finished.clone();
        w.watch("late but done", Box::new(move || f.load(Ordering::SeqCst)));
        w.watch("done", Box::new(|| true));
        std::thread::sleep(Duration::from_millis(50));
        finished.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        drop(w);
        assert!(seen.lock().unwrap().is_empty());
    }
}
