//! `orchestrator`: the command line client. Everything is in the library's `cli` module.

fn main() -> std::process::ExitCode {
    orchestrator_producer::cli::main()
}
