//! The host terminal while a guest pseudo-terminal is attached (`exec -it`,
//! `run -it`): raw mode, so every key (Ctrl-C and Ctrl-Z included) reaches the
//! guest's pty as a character and the guest's line discipline makes of it what
//! a local terminal would; the mode saved before is put back on every way out:
//! the guard's drop, a panic (the hook runs before `panic = "abort"`), and,
//! when asked, SIGINT, SIGTERM, SIGHUP or SIGQUIT (restored, then the command
//! exits 128 + the signal; `run` has its own handler, which ends the VM and
//! then drops the guard). The window size goes to the guest at the start and
//! on SIGWINCH.

use std::io::IsTerminal;
use std::os::fd::RawFd;
use std::sync::{Mutex, Once};

use crate::Error;

/// The terminal the mode is set on: stdin.
const FD: RawFd = 0;

/// The mode to put back, while raw mode is on.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);
static HOOKS: Once = Once::new();

/// Raw mode on stdin for as long as this lives.
#[derive(Debug)]
pub struct Raw(());

impl Raw {
    /// Puts stdin's terminal into raw mode; an error when stdin is not a
    /// terminal (as docker's "the input device is not a TTY"). With
    /// `exit_on_signals`, a terminating signal restores the mode and exits.
    pub fn enter(exit_on_signals: bool) -> Result<Self, Error> {
        if !std::io::stdin().is_terminal() {
            return Err(Error::Usage(
                "the input device is not a TTY: -t with -i needs a terminal on stdin \
                 (drop -t to pipe input)"
                    .into(),
            ));
        }
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes one termios to a valid pointer.
        if unsafe { libc::tcgetattr(FD, &mut saved) } != 0 {
            return Err(Error::Usage(format!(
                "cannot read the terminal's mode: {}",
                std::io::Error::last_os_error()
            )));
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the termios it is given, which is valid.
        unsafe { libc::cfmakeraw(&mut raw) };
        if let Ok(mut s) = SAVED.lock() {
            *s = Some(saved);
        }
        install_hooks(exit_on_signals);
        // SAFETY: tcsetattr reads one valid termios.
        if unsafe { libc::tcsetattr(FD, libc::TCSANOW, &raw) } != 0 {
            let e = std::io::Error::last_os_error();
            restore();
            return Err(Error::Usage(format!(
                "cannot put the terminal into raw mode: {e}"
            )));
        }
        Ok(Self(()))
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        restore();
    }
}

/// Puts the saved mode back (once; later calls do nothing).
fn restore() {
    let saved = match SAVED.lock() {
        Ok(mut s) => s.take(),
        Err(p) => p.into_inner().take(),
    };
    if let Some(t) = saved {
        // SAFETY: tcsetattr reads one valid termios.
        unsafe { libc::tcsetattr(FD, libc::TCSANOW, &t) };
    }
}

/// The panic hook and (with `signals`) the signal thread that restore the mode.
fn install_hooks(signals: bool) {
    HOOKS.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        if !signals {
            return;
        }
        use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
        let Ok(mut signals) =
            signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT])
        else {
            tracing::warn!("a signal will leave the terminal in raw mode");
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("sm-terminal".into())
            .spawn(move || {
                if let Some(signal) = signals.forever().next() {
                    restore();
                    std::process::exit(128 + signal);
                }
            });
        if spawned.is_err() {
            tracing::warn!("a signal will leave the terminal in raw mode");
        }
    });
}

/// The terminal's size (rows, columns), from stdout or else stdin; `None`
/// when neither is a terminal.
pub fn size() -> Option<(u16, u16)> {
    [1, FD].into_iter().find_map(|fd| {
        // SAFETY: winsize is plain data; TIOCGWINSZ fills it.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes one winsize to a valid pointer.
        let ok = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0;
        (ok && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
    })
}

/// Calls `f` with the new size on every SIGWINCH, on a thread of its own.
pub fn on_resize(f: impl Fn(u16, u16) + Send + 'static) {
    let Ok(mut signals) = signal_hook::iterator::Signals::new([signal_hook::consts::SIGWINCH])
    else {
        tracing::warn!("window size changes will not reach the guest");
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("sm-winch".into())
        .spawn(move || {
            // Started before the VMM's sandbox (`run -t`): it confines itself.
            if let Err(e) = crate::sandbox::confine_helper_thread() {
                tracing::warn!("the window-size thread is not sandboxed: {e}");
            }
            for _ in signals.forever() {
                if let Some((rows, cols)) = size() {
                    f(rows, cols);
                }
            }
        });
    if spawned.is_err() {
        tracing::warn!("window size changes will not reach the guest");
    }
}
