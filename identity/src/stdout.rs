//! Standard output for both command lines. `print!` and `println!` panic
//! when the reader has gone (`keyproof-ca bundle | head -1`); these end the
//! command quietly instead, as other Unix tools do, and report any other
//! write error once. Each binary imports them under the standard names.

/// Ends the process for a failed write to standard output: quietly (exit 0)
/// when the reader closed the pipe, with the error otherwise (exit 1).
#[doc(hidden)]
pub fn write_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: writing to standard output: {e}");
    std::process::exit(1)
}

/// `print!` that ends the command quietly when standard output is closed.
#[macro_export]
macro_rules! out_print {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        if let Err(e) = ::std::write!(::std::io::stdout().lock(), $($arg)*) {
            $crate::stdout::write_failed(e)
        }
    }};
}

/// `println!` that ends the command quietly when standard output is closed.
#[macro_export]
macro_rules! out_println {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        if let Err(e) = ::std::writeln!(::std::io::stdout().lock(), $($arg)*) {
            $crate::stdout::write_failed(e)
        }
    }};
}
