//! The `kms` command, built inside the test package so that end-to-end tests always run the
//! current code.

fn main() -> std::process::ExitCode {
    kms_cli::main()
}
