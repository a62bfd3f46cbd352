//! An in-process group of ranks (one thread each) for tests: what NCCL or TCP would exchange
//! goes through shared memory, summed in rank order. A sum reduced to its root arrives as
//! NCCL's on its own stream does: the buffer handed back holds NaN until
//! [`Collective::settle`], so a caller that reads it too early sees it in the tests.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor};

use super::{comm_err, Collective};
use crate::error::Result;

struct Shared {
    n: usize,
    slots: Mutex<Vec<Option<Tensor>>>,
    /// (arrived, generation) of the barrier.
    gate: Mutex<(usize, u64)>,
    cv: Condvar,
    timeout: Duration,
}

/// One rank of an in-process group; make them with [`group`] and move each to its thread.
pub struct ThreadComm {
    rank: usize,
    s: Arc<Shared>,
    /// Sums reduced to this rank and not yet settled: (the buffer handed back, its value).
    unsettled: Mutex<Vec<(Tensor, Tensor)>>,
}

/// `n` ranks sharing one exchange; a rank that waits `timeout` for the others gets an error.
pub fn group(n: usize, timeout: Duration) -> Vec<ThreadComm> {
    let s = Arc::new(Shared {
        n,
        slots: Mutex::new(vec![None; n]),
        gate: Mutex::new((0, 0)),
        cv: Condvar::new(),
        timeout,
    });
    (0..n)
        .map(|rank| ThreadComm {
            rank,
            s: s.clone(),
            unsettled: Mutex::new(Vec::new()),
        })
        .collect()
}

impl ThreadComm {
    fn wait(&self) -> Result<()> {
        let mut g = self.s.gate.lock().unwrap();
        let generation = g.1;
        g.0 += 1;
        if g.0 == self.s.n {
            *g = (0, generation + 1);
            self.s.cv.notify_all();
            return Ok(());
        }
        let (g, t) = self
            .s
            .cv
            .wait_timeout_while(g, self.s.timeout, |g| g.1 == generation)
            .unwrap();
        drop(g);
        if t.timed_out() {
            return Err(comm_err(self.rank, "timed out waiting for the other ranks"));
        }
        Ok(())
    }

    fn deposit(&self, t: &Tensor) -> Result<()> {
        self.s.slots.lock().unwrap()[self.rank] = Some(t.to_device(&Device::Cpu)?);
        Ok(())
    }
}

impl Collective for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.s.n
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.deposit(t)?;
        self.wait()?;
        let sum = {
            let slots = self.s.slots.lock().unwrap();
            let mut it = slots
                .iter()
                .map(|s| s.as_ref().expect("every rank deposited"));
            let mut acc = it.next().expect("one rank").clone();
            for x in it {
                acc = (acc + x)?;
            }
            acc
        };
        // Nobody deposits the next operand before everyone has read this one.
        self.wait()?;
        Ok(sum.to_device(t.device())?)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if self.rank == root {
            self.deposit(t)?;
        }
        self.wait()?;
        let v = self.s.slots.lock().unwrap()[root]
            .clone()
            .expect("the root deposited");
        self.wait()?;
        Ok(v.to_device(t.device())?)
    }

    fn reduce_sum_owned(&self, t: Tensor, root: usize) -> Result<Option<Tensor>> {
        // A buffer of its own: with one rank the sum would share `t`'s, which is poisoned below.
        let sum = self.all_reduce_sum(&t)?.copy()?;
        if self.rank != root {
            return Ok(None);
        }
        if !t.device().is_cpu() || !t.is_contiguous() {
            return Ok(Some(sum));
        }
        t.inplace_op1(&Overwrite(None))?;
        self.unsettled.lock().unwrap().push((t.clone(), sum));
        Ok(Some(t))
    }

    fn settle(&self) -> Result<()> {
        for (buffer, sum) in self.unsettled.lock().unwrap().drain(..) {
            buffer.inplace_op1(&Overwrite(Some(sum)))?;
        }
        Ok(())
    }
}

/// Writes a tensor's values (`None`: NaN) into a contiguous CPU buffer of the same size.
struct Overwrite(Option<Tensor>);

impl InplaceOp1 for Overwrite {
    fn name(&self) -> &'static str {
        "packsft-threads-overwrite"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let (at, n) = (l.start_offset(), l.shape().elem_count());
        let values = match &self.0 {
            Some(t) => t.flatten_all()?,
            None => Tensor::full(f32::NAN, n, &Device::Cpu)?,
        };
        if values.elem_count() != n {
            candle_core::bail!("overwrite of {n} elements with {}", values.elem_count());
        }
        let dtype = match s {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F64(_) => DType::F64,
            CpuStorage::BF16(_) => DType::BF16,
            _ => candle_core::bail!("overwrite of a buffer that is not F32, F64 or BF16"),
        };
        let values = values.to_dtype(dtype)?.contiguous()?;
        let (src, src_layout) = values.storage_and_layout();
        let from = src_layout.start_offset();
        match (s, &*src) {
            (CpuStorage::F32(d), candle_core::Storage::Cpu(CpuStorage::F32(v))) => {
                d[at..at + n].copy_from_slice(&v[from..from + n])
            }
            (CpuStorage::F64(d), candle_core::Storage::Cpu(CpuStorage::F64(v))) => {
                d[at..at + n].copy_from_slice(&v[from..from + n])
            }
            (CpuStorage::BF16(d), candle_core::Storage::Cpu(CpuStorage::BF16(v))) => {
                d[at..at + n].copy_from_slice(&v[from..from + n])
            }
            _ => candle_core::bail!("overwrite: the values did not convert to the buffer's dtype"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_sum_and_broadcast_in_rank_order() {
        let comms = group(3, Duration::from_secs(10));
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let r = c.rank() as f32;
                    let t = Tensor::new(&[r, 10.0 * r], &Device::Cpu).unwrap();
                    let s = c.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap();
                    let b = c.broadcast(&t, 2).unwrap().to_vec1::<f32>().unwrap();
                    (s, b)
                })
            })
            .collect();
        for h in handles {
            let (s, b) = h.join().unwrap();
            assert_eq!(s, vec![3.0, 30.0]);
            assert_eq!(b, vec![2.0, 20.0]);
        }
    }

    #[test]
    fn a_missing_rank_is_a_timeout_not_a_hang() {
        let mut comms = group(2, Duration::from_millis(200));
        let c = comms.remove(0);
        let e = c
            .all_reduce_sum(&Tensor::new(&[1f32], &Device::Cpu).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 0") && e.contains("timed out"), "{e}");
    }
}
