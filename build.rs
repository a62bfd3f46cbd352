//! Build script: with the `cuda` feature, compiles this project's CUDA kernels (src/cuda/kernels/*.cu:
//! the fused optimizer, and with `flash-attn` the attention kernels) to PTX with nvcc; the
//! binary embeds the PTX and the driver JIT-compiles it for the card on first use. The default
//! (CPU) build runs nothing here.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/cuda/kernels/flash_attn.cu");
    println!("cargo:rerun-if-changed=src/cuda/kernels/optim.cu");
    println!("cargo:rerun-if-changed=src/cuda/kernels/fused_ops.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let mut kernels = vec!["optim", "fused_ops"];
    if std::env::var_os("CARGO_FEATURE_FLASH_ATTN").is_some() {
        kernels.push("flash_attn");
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
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
    if cap < 80 && kernels.contains(&"flash_attn") {
        panic!("packsft's flash-attention kernels need compute capability >= 8.0 (CUDA_COMPUTE_CAP={cap})");
    }
    for k in kernels {
        let src = format!("src/cuda/kernels/{k}.cu");
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            // Approximate exp2 in the attention softmax; the optimizer keeps IEEE sqrt and division.
            .args((k == "flash_attn").then_some("--use_fast_math"))
            .arg(format!("-arch=sm_{cap}"))
            .arg(&src)
            .arg("-o")
            .arg(out_dir.join(format!("{k}.ptx")))
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run {nvcc} (set CUDA_HOME or NVCC to a CUDA toolkit's nvcc): {e}")
            });
        if !status.success() {
            panic!("{nvcc} failed on {src} ({status})");
        }
    }
}
