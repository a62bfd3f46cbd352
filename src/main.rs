//! The `packsft` binary: the command line lives in the library (`packsft::cli`).

fn main() -> std::process::ExitCode {
    packsft::cli::main()
}
