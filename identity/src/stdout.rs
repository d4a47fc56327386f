//! Standard output for both command lines. `print!` and `println!` panic
//! when the reader has gone (`keyproof-ca bundle | head -1`); with these
//! the command carries on and ends as it would have (what it wrote to
//! files stays whole), the output going nowhere. Any other write error is
//! reported once and makes the exit status a failure ([`failed`]). Each
//! binary imports them under the standard names.

static FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Notes a failed write to standard output: nothing to say when the reader
/// closed the pipe (the rest of the output goes nowhere); any other error
/// is reported once, and [`failed`] turns true.
#[doc(hidden)]
pub fn write_failed(e: std::io::Error) {
    if e.kind() != std::io::ErrorKind::BrokenPipe
        && !FAILED.swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        eprintln!("error: writing to standard output: {e}");
    }
}

/// Whether a write to standard output failed other than by a closed pipe:
/// `main` then ends with a failure status.
pub fn failed() -> bool {
    FAILED.load(std::sync::atomic::Ordering::Relaxed)
}

/// `print!` that survives a closed standard output.
#[macro_export]
macro_rules! out_print {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        if let Err(e) = ::std::write!(::std::io::stdout().lock(), $($arg)*) {
            $crate::stdout::write_failed(e)
        }
    }};
}

/// `println!` that survives a closed standard output.
#[macro_export]
macro_rules! out_println {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        if let Err(e) = ::std::writeln!(::std::io::stdout().lock(), $($arg)*) {
            $crate::stdout::write_failed(e)
        }
    }};
}
