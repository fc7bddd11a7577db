//! Where log lines go. `audgate serve` logs one line per decision, and a `write(2)` per line
//! was the largest single cost of a cached check (docs/performance.md). So `serve` hands its
//! lines to a writer thread over a bounded channel; the thread writes them in batches and
//! flushes whenever it has drained the channel: one line at a time when idle, many per
//! `write(2)` under load. Nothing is dropped: when the channel is full (a stalled log
//! collector), a log call waits, as a direct write to stderr would.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

/// Flushes and stops the writer thread when dropped: keep it until the process ends.
pub type Guard = tracing_appender::non_blocking::WorkerGuard;

/// Lines the writer thread may hold before a log call waits (~2.5 MB of decision lines).
const BUFFERED_LINES: usize = 8192;
/// The writer thread's buffer: one `write(2)` per this many bytes at most, under load.
const WRITE_BUFFER_BYTES: usize = 64 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    /// Every line written to stderr by the thread that logs it (the one-shot commands).
    Stderr,
    /// Lines written to stderr by the writer thread (`serve`).
    Thread,
}

/// Install the global subscriber: `filter`, text or JSON lines, to stderr through `writer`.
/// Colours only on a terminal, and never with `NO_COLOR` set.
pub fn init(filter: EnvFilter, json: bool, writer: Writer) -> Option<Guard> {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let (make_writer, guard) = match writer {
        Writer::Stderr => (BoxMakeWriter::new(std::io::stderr), None),
        Writer::Thread => {
            let (make_writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
                .lossy(false)
                .buffered_lines_limit(BUFFERED_LINES)
                .thread_name("audgate-log")
                .finish(std::io::BufWriter::with_capacity(WRITE_BUFFER_BYTES, std::io::stderr()));
            (BoxMakeWriter::new(make_writer), Some(guard))
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(make_writer)
        .with_ansi(ansi);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
    guard
}
