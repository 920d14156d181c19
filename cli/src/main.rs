//! `kms`: the sovereign-kms command. See the `kms_cli` library for everything it does.

/// jemalloc, process-wide: under load glibc malloc contention cost more than the HSM calls
/// (bench/RESULTS.md); with jemalloc, batches of 100 data keys run about 30% faster.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    kms_cli::main()
}
