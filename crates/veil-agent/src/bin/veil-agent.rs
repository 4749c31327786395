//! The veil-agent binary: see the library for what it does.
fn main() -> std::process::ExitCode {
    veil_agent::main()
}
