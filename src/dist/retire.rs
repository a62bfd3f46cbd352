//! Buffers a device collective still reads or writes after this rank let go of them.
//!
//! NCCL runs on a stream of its own, so a bucket's reduction overlaps the backward that goes on
//! making the next buckets. A buffer is freed on the stream that made it (candle's): a bucket
//! reduced to another rank and freed at once could have its memory reused by candle's stream
//! while NCCL still sends it, and making candle's stream wait for the reduction first would
//! lose the overlap. So such buffers are held here until their collective has completed, or
//! until more than a byte limit waits (then the oldest goes, after candle's stream waited for
//! it: memory stays bounded when the link is slower than the backward).

use std::collections::VecDeque;

/// Whether the collective that used a held item has completed (a CUDA event's query).
pub type Done = Box<dyn Fn() -> bool + Send>;

/// Items held until their collective completes, oldest first, at most `limit` bytes of them.
pub struct Retired<T> {
    queue: VecDeque<(T, usize, Done)>,
    held_bytes: usize,
    limit: usize,
}

impl<T> Retired<T> {
    /// A queue that holds at most `limit` bytes (one item is always held, however large).
    pub fn new(limit: usize) -> Self {
        Self {
            queue: VecDeque::new(),
            held_bytes: 0,
            limit,
        }
    }

    /// Bytes held now.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Items held now.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Holds `item` (`bytes` long) until `done`, and returns, oldest first, the items to let go
    /// now: every one whose collective has completed, then the oldest ones while more than the
    /// limit would be held.
    pub fn hold(&mut self, item: T, bytes: usize, done: Done) -> Vec<T> {
        let mut out = self.release_done();
        self.queue.push_back((item, bytes, done));
        self.held_bytes += bytes;
        while self.held_bytes > self.limit && self.queue.len() > 1 {
            out.extend(self.pop_front());
        }
        out
    }

    /// The items whose collective has completed, oldest first; the others stay.
    pub fn release_done(&mut self) -> Vec<T> {
        let mut out = Vec::new();
        let mut kept = VecDeque::with_capacity(self.queue.len());
        for (item, bytes, done) in self.queue.drain(..) {
            if done() {
                self.held_bytes -= bytes;
                out.push(item);
            } else {
                kept.push_back((item, bytes, done));
            }
        }
        self.queue = kept;
        out
    }

    /// Every item held, oldest first, done or not (the caller orders their freeing).
    pub fn release_all(&mut self) -> Vec<T> {
        self.held_bytes = 0;
        self.queue.drain(..).map(|(item, _, _)| item).collect()
    }

    fn pop_front(&mut self) -> Option<T> {
        let (item, bytes, _) = self.queue.pop_front()?;
        self.held_bytes -= bytes;
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn flag() -> (Arc<AtomicBool>, Done) {
        let f = Arc::new(AtomicBool::new(false));
        let g = f.clone();
        (f, Box::new(move || g.load(Ordering::SeqCst)))
    }

    #[test]
    fn items_wait_for_their_collective_and_go_when_it_completes() {
        let mut r = Retired::new(1000);
        let (a_done, a) = flag();
        let (_b_done, b) = flag();
        assert!(r.hold("a", 100, a).is_empty());
        assert!(r.hold("b", 100, b).is_empty());
        assert_eq!((r.len(), r.held_bytes()), (2, 200));
        assert!(r.release_done().is_empty());
        a_done.store(true, Ordering::SeqCst);
        assert_eq!(r.release_done(), vec!["a"]);
        assert_eq!((r.len(), r.held_bytes()), (1, 100));
    }

    #[test]
    fn a_completed_item_goes_even_behind_one_still_running() {
        let mut r = Retired::new(1000);
        let (_a_done, a) = flag();
        let (b_done, b) = flag();
        r.hold("a", 10, a);
        r.hold("b", 10, b);
        b_done.store(true, Ordering::SeqCst);
        let (_c_done, c) = flag();
        assert_eq!(r.hold("c", 10, c), vec!["b"]);
        assert_eq!((r.len(), r.held_bytes()), (2, 20));
    }

    #[test]
    fn past_the_limit_the_oldest_go_first_whether_done_or_not() {
        let mut r = Retired::new(250);
        for name in ["a", "b"] {
            let (_d, done) = flag();
            assert!(r.hold(name, 100, done).is_empty());
        }
        let (_d, done) = flag();
        assert_eq!(r.hold("c", 100, done), vec!["a"]);
        assert_eq!(r.held_bytes(), 200);
        // One item larger than the limit is still held: the caller's buffer must outlive its
        // collective or the compute stream waits for it.
        let (_d, done) = flag();
        assert_eq!(r.hold("big", 1000, done), vec!["b", "c"]);
        assert_eq!((r.len(), r.held_bytes()), (1, 1000));
        let (_d, done) = flag();
        r.hold("last", 10, done);
        assert_eq!(
            r.release_all(),
            vec!["last"],
            "past the limit, the big one went first"
        );
        assert!(r.is_empty() && r.held_bytes() == 0);
    }
}
