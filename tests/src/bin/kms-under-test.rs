//! The `kms` command, built inside the test package so that end-to-end tests always run the
//! current code, with the same allocator as the shipped binary.

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    kms_cli::main()
}
