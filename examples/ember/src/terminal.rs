//! Raw mode for the terminal on stdin while the guest owns the console.

use std::io::{self, IsTerminal};

use vmm_sys_util::terminal::Terminal;

/// Puts stdin in raw mode when it is a terminal, and back in canonical mode when dropped, so keys
/// such as Ctrl-C reach the guest instead of ending `ember`.
#[derive(Debug)]
pub struct RawStdin {
    active: bool,
}

impl RawStdin {
    /// Switches stdin to raw mode if it is a terminal; does nothing otherwise.
    pub fn enable() -> io::Result<Self> {
        let stdin = io::stdin();
        if !stdin.is_terminal() {
            return Ok(RawStdin { active: false });
        }
        stdin.lock().set_raw_mode().map_err(io::Error::from)?;
        Ok(RawStdin { active: true })
    }
}

impl Drop for RawStdin {
    fn drop(&mut self) {
        if self.active {
            // Nothing useful can be done if the terminal refuses at exit.
            let _ = io::stdin().lock().set_canon_mode();
        }
    }
}
