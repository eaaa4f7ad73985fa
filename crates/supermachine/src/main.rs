//! The `supermachine` command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, Subcommand};

/// Exit code for supermachine's own failures (docker run uses 125 likewise), so they
/// are told apart from the guest's exit status.
const EXIT_INTERNAL: u8 = 125;

#[derive(Parser, Debug)]
#[command(
    name = "supermachine",
    version,
    about = "Run OCI images as hardware-isolated microVMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a kernel with supermachine's guest init; prints the guest console and
    /// exits with the guest's exit status.
    Boot {
        /// Kernel image (bzImage, or ELF with a PVH entry). Default: Debian's cloud
        /// kernel, provisioned on first use ($SUPERMACHINE_KERNEL overrides).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Initramfs. Default: supermachine's own for a Linux kernel.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Kernel command line.
        #[arg(long)]
        cmdline: Option<String>,
        /// Guest memory, e.g. 512M or 1G.
        #[arg(long, value_parser = parse_memory)]
        memory: Option<u64>,
        /// Number of vCPUs.
        #[arg(long)]
        cpus: Option<u32>,
        /// Attach a disk image as virtio-blk: PATH or PATH,ro (repeatable; the first
        /// is the guest's /dev/vda).
        #[arg(long = "disk", value_parser = parse_disk)]
        disks: Vec<supermachine::DiskSpec>,
    },
    /// Print the path of the guest kernel (provisioning it on first use).
    Kernel,
}

fn parse_disk(s: &str) -> Result<supermachine::DiskSpec, String> {
    supermachine::DiskSpec::parse(s).map_err(|e| e.to_string())
}

fn parse_memory(s: &str) -> Result<u64, String> {
    supermachine::parse_size(s).map_err(|e| e.to_string())
}

/// One line: the error and its causes, joined.
fn report(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let cs = c.to_string();
        if !s.contains(&cs) {
            s.push_str(": ");
            s.push_str(&cs);
        }
        cur = c.source();
    }
    s
}

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = Cli::parse();
    match cli.command {
        Command::Boot {
            kernel,
            initrd,
            cmdline,
            memory,
            cpus,
            disks,
        } => {
            let cfg = supermachine::BootConfig {
                kernel,
                initrd,
                cmdline,
                memory,
                cpus,
                disks,
            };
            let timings = Arc::new(supermachine::Timings::start_at(start));
            match supermachine::boot_with_console(&cfg, Box::new(std::io::stdout()), timings) {
                Ok(outcome) => {
                    if outcome.exit != supermachine::GuestExit::PowerOff {
                        eprintln!("supermachine: guest ended with {:?}", outcome.exit);
                    }
                    ExitCode::from(outcome.exit_code() as u8)
                }
                Err(e) => {
                    eprintln!("supermachine: error: {}", report(&e));
                    ExitCode::from(EXIT_INTERNAL)
                }
            }
        }
        Command::Kernel => match runner::kernel::provision() {
            Ok(k) => {
                println!("{}", k.kernel.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("supermachine: error: {}", report(&e));
                ExitCode::from(EXIT_INTERNAL)
            }
        },
    }
}
