//! `kiln init [DIR] [--output PATH] [--force]`

use std::path::PathBuf;

use clap::Args;

use super::progress::CliReporter;
use crate::Error;

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The images: a folder of class folders (DIR/<class>/<image>, or
    /// DIR/<split>/<class>/<image>), or a CSV listing of image paths and labels (the file,
    /// or a folder holding it).
    #[arg(value_name = "DIR", default_value = ".")]
    dir: PathBuf,
    /// Where to write the manifest.
    #[arg(short, long, value_name = "PATH", default_value = "kiln.toml")]
    output: PathBuf,
    /// Overwrite PATH if it exists.
    #[arg(long)]
    force: bool,
}

pub fn init(args: InitArgs, reporter: &CliReporter) -> Result<(), Error> {
    let written = crate::init::init(&crate::init::Options { dir: args.dir, output: args.output, force: args.force })?;
    for line in written.summary() {
        reporter.line(&line);
    }
    Ok(())
}
