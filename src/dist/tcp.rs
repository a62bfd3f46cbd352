//! Ranks of one run over TCP, in a star around rank 0 (at `MASTER_ADDR:MASTER_PORT`): the
//! rendezvous of every run (each rank shows the hash of its recipe, data and binary, and a rank
//! with another hash is refused before any training), the collectives of CPU runs, and the
//! channel that carries NCCL's unique id to the other ranks of a GPU run. Every read and write
//! has a timeout: a rank that dies or stalls is an error naming it, never a hang.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use super::{comm_err, Collective, World};
use crate::error::Result;

const MAGIC: u32 = 0x7061_636b; // "pack"

/// This rank's connections: rank 0 holds one to every other rank, the others one to rank 0.
pub struct TcpComm {
    rank: usize,
    size: usize,
    /// Indexed by rank on rank 0 (its own entry empty); one entry (rank 0) elsewhere.
    peers: Vec<Option<Mutex<TcpStream>>>,
}

/// Meets the other ranks of `world`: rank 0 listens and waits for all, the others connect
/// (retrying until `timeout`). Every rank's `run_hash` must equal rank 0's.
pub fn connect(world: &World, run_hash: u64, timeout: Duration) -> Result<TcpComm> {
    let rank = world.rank;
    let deadline = Instant::now() + timeout;
    let addr = format!("{}:{}", world.master_addr, world.master_port);
    let err = |what: String| comm_err(rank, what);
    if rank == 0 {
        let listener = TcpListener::bind(("0.0.0.0", world.master_port))
            .map_err(|e| err(format!("cannot listen on port {}: {e}", world.master_port)))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| err(e.to_string()))?;
        let mut peers: Vec<Option<Mutex<TcpStream>>> = (0..world.size).map(|_| None).collect();
        let mut refused = Vec::new();
        let mut joined = 1;
        while joined < world.size {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).map_err(|e| err(e.to_string()))?;
                    set_timeouts(&s, timeout).map_err(|e| err(e.to_string()))?;
                    let hello = read_u64s(&mut s, 4).map_err(|e| err(format!("handshake: {e}")))?;
                    let (magic, r, size, hash) = (
                        hello[0] as u32,
                        hello[1] as usize,
                        hello[2] as usize,
                        hello[3],
                    );
                    let problem = if magic != MAGIC {
                        Some("is not a packsft rank".to_string())
                    } else if size != world.size {
                        Some(format!("has WORLD_SIZE {size}, rank 0 has {}", world.size))
                    } else if r == 0 || r >= world.size || peers[r].is_some() {
                        Some(format!(
                            "announced rank {r}, which is taken or out of range"
                        ))
                    } else if hash != run_hash {
                        Some(format!(
                            "runs another recipe, data or binary (hash {hash:016x}, rank 0 has {run_hash:016x})"
                        ))
                    } else {
                        None
                    };
                    let reply = problem.clone().unwrap_or_default();
                    write_frame(&mut s, reply.as_bytes()).map_err(|e| err(e.to_string()))?;
                    match problem {
                        Some(p) => refused.push(format!("rank {r} {p}")),
                        None => peers[r] = Some(Mutex::new(s)),
                    }
                    joined += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let missing: Vec<usize> =
                            (1..world.size).filter(|&r| peers[r].is_none()).collect();
                        return Err(err(format!(
                            "timed out after {timeout:?} waiting for ranks {missing:?} to join at {addr}"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(err(format!("accept: {e}"))),
            }
        }
        if !refused.is_empty() {
            return Err(err(format!("refused: {}", refused.join("; "))));
        }
        return Ok(TcpComm {
            rank,
            size: world.size,
            peers,
        });
    }
    let mut s = loop {
        match TcpStream::connect(&addr) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(err(format!(
                    "cannot reach rank 0 at {addr} within {timeout:?}: {e}"
                )))
            }
        }
    };
    set_timeouts(&s, timeout).map_err(|e| err(e.to_string()))?;
    let hello = [MAGIC as u64, rank as u64, world.size as u64, run_hash];
    write_u64s(&mut s, &hello).map_err(|e| err(format!("handshake: {e}")))?;
    let reply = read_frame(&mut s).map_err(|e| err(format!("handshake: {e}")))?;
    if !reply.is_empty() {
        return Err(err(format!(
            "rank 0 refused this rank: it {}",
            String::from_utf8_lossy(&reply)
        )));
    }
    Ok(TcpComm {
        rank,
        size: world.size,
        peers: vec![Some(Mutex::new(s))],
    })
}

fn set_timeouts(s: &TcpStream, t: Duration) -> std::io::Result<()> {
    s.set_read_timeout(Some(t))?;
    s.set_write_timeout(Some(t))?;
    s.set_nodelay(true)
}

fn write_u64s(s: &mut TcpStream, v: &[u64]) -> std::io::Result<()> {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    s.write_all(&bytes)
}

fn read_u64s(s: &mut TcpStream, n: usize) -> std::io::Result<Vec<u64>> {
    let mut buf = vec![0u8; 8 * n];
    s.read_exact(&mut buf)?;
    Ok(buf
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

fn write_frame(s: &mut TcpStream, b: &[u8]) -> std::io::Result<()> {
    write_u64s(s, &[b.len() as u64])?;
    s.write_all(b)
}

fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let n = read_u64s(s, 1)?[0] as usize;
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

/// A tensor as bytes: float32 or float64 values (bf16 and f16 travel as float32, exactly).
fn encode(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.to_device(&Device::Cpu)?.flatten_all()?;
    Ok(match t.dtype() {
        DType::F64 => t
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        _ => t
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
    })
}

/// [`encode`]'s bytes back into a tensor like `like`.
fn decode(b: &[u8], like: &Tensor) -> Result<Tensor> {
    let t = match like.dtype() {
        DType::F64 => {
            let v: Vec<f64> = b
                .chunks(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            Tensor::from_vec(v, like.shape(), &Device::Cpu)?
        }
        dt => {
            let v: Vec<f32> = b
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            Tensor::from_vec(v, like.shape(), &Device::Cpu)?.to_dtype(dt)?
        }
    };
    Ok(t.to_device(like.device())?)
}

impl TcpComm {
    fn send(&self, to: usize, b: &[u8]) -> Result<()> {
        let slot = if self.rank == 0 { to } else { 0 };
        let mut s = self.peers[slot]
            .as_ref()
            .expect("a connection")
            .lock()
            .unwrap();
        write_frame(&mut s, b)
            .map_err(|e| comm_err(self.rank, format!("sending to rank {to}: {e}")))
    }

    fn recv(&self, from: usize) -> Result<Vec<u8>> {
        let slot = if self.rank == 0 { from } else { 0 };
        let mut s = self.peers[slot]
            .as_ref()
            .expect("a connection")
            .lock()
            .unwrap();
        read_frame(&mut s).map_err(|e| {
            comm_err(
                self.rank,
                format!("lost rank {from} (it died, stalled or timed out): {e}"),
            )
        })
    }

    /// `root`'s bytes on every rank (NCCL's unique id, say).
    pub fn broadcast_bytes(&self, b: &[u8], root: usize) -> Result<Vec<u8>> {
        if self.size == 1 {
            return Ok(b.to_vec());
        }
        if self.rank == 0 {
            let v = if root == 0 {
                b.to_vec()
            } else {
                self.recv(root)?
            };
            for r in 1..self.size {
                if r != root {
                    self.send(r, &v)?;
                }
            }
            Ok(v)
        } else if self.rank == root {
            self.send(0, b)?;
            Ok(b.to_vec())
        } else {
            self.recv(0)
        }
    }
}

impl Collective for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        if self.size == 1 {
            return Ok(t.clone());
        }
        if self.rank == 0 {
            let mut acc = t.to_device(&Device::Cpu)?;
            for r in 1..self.size {
                acc = (acc + decode(&self.recv(r)?, &t.to_device(&Device::Cpu)?)?)?;
            }
            let b = encode(&acc)?;
            for r in 1..self.size {
                self.send(r, &b)?;
            }
            Ok(acc.to_device(t.device())?)
        } else {
            self.send(0, &encode(t)?)?;
            decode(&self.recv(0)?, t)
        }
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let b = self.broadcast_bytes(&encode(t)?, root)?;
        if self.rank == root {
            return Ok(t.clone());
        }
        decode(&b, t)
    }
}
