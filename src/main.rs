use clap::Parser;

fn main() -> std::process::ExitCode {
    let _cli = precall::cli::Cli::parse();
    std::process::ExitCode::SUCCESS
}
