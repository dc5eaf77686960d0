use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

#[macro_use]
mod cli;

fn main() -> ExitCode {
    let args = match cli::Cli::try_parse() {
        Ok(a) => a,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => e.exit(),
        Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        Err(e) => {
            // One line: clap's message up to its usage hints, without "error: ".
            let text = e.render().to_string();
            let msg: Vec<&str> = text.lines().take_while(|l| !l.trim().is_empty()).map(str::trim).collect();
            tell!("dropblock: error: {}", msg.join(" ").trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_closed_stdout() => ExitCode::SUCCESS,
        Err(e) => {
            tell!("dropblock: error: {e}");
            ExitCode::FAILURE
        }
    }
}
