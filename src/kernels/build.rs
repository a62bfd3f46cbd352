//! Build script: with the `flash-attn` feature, compiles this project's CUDA kernels
//! (src/kernels/*.cu) to PTX with nvcc; the binary embeds the PTX and the driver JIT-compiles it
//! for the card on first use. The default (CPU) build runs nothing here.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/kernels/flash_attn.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_FLASH_ATTN").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("flash_attn.ptx");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| match std::env::var("CUDA_HOME") {
        Ok(home) => format!("{home}/bin/nvcc"),
        Err(_) => "nvcc".into(),
    });
    // mma.sync with bf16 operands needs compute capability 8.0 (Ampere) or newer; PTX built for
    // 8.0 also runs on 9.0 (Hopper), so 80 is the default.
    let cap: u32 = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or(80);
    if cap < 80 {
        panic!("packsft's flash-attention kernels need compute capability >= 8.0 (CUDA_COMPUTE_CAP={cap})");
    }
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", "--use_fast_math"])
        .arg(format!("-arch=sm_{cap}"))
        .arg("src/kernels/flash_attn.cu")
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run {nvcc} (set CUDA_HOME or NVCC to a CUDA toolkit's nvcc): {e}")
        });
    if !status.success() {
        panic!("{nvcc} failed on src/kernels/flash_attn.cu ({status})");
    }
}
