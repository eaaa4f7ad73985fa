//! Runs an image's command in a microVM and exits with its status:
//!
//! ```sh
//! cargo run -p supermachine --example run -- localhost:5000/busybox:1 echo hello
//! ```
//!
//! The image is pulled on first use; its stdout and stderr are this process's.

fn main() -> std::process::ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(image) = args.next() else {
        eprintln!("usage: run IMAGE [CMD ARGS...]");
        return std::process::ExitCode::from(2);
    };
    let cmd: Vec<String> = args.collect();
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    match supermachine::run_image(&image, &cmd) {
        Ok(code) => std::process::ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(125)
        }
    }
}
