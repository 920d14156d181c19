//! `kms`: the sovereign-kms command. See the `kms_cli` library for everything it does.

fn main() -> std::process::ExitCode {
    kms_cli::main()
}
