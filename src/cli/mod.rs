//! The `dropblock` command line: a demo and inspection tools.

/// `println!` that hands a failed write back as [`CliError::Stdout`] instead of
/// panicking (a closed pipe: `dropblock bench | head -1`).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*).map_err(crate::cli::CliError::Stdout)
    }};
}

/// `eprintln!` that drops a failed write: with stderr closed (`2>&-`, a reader
/// gone) the message is lost, not the command's work or its exit status.
macro_rules! tell {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `say!` for a command whose work is a file: a closed stdout (`dropblock demo |
/// head -3`) ends the report, not the work.
macro_rules! report {
    ($($arg:tt)*) => {{
        match say!($($arg)*) {
            Err(e) if e.is_closed_stdout() => Ok(()),
            other => other,
        }
    }};
}

mod apply;
mod bench;
#[cfg(feature = "cuda")]
mod cuda_timing;
mod demo;
mod device;
mod image;
pub mod npy;
mod show;

use clap::{Args, Parser, Subcommand};
use dropblock::{Anchor, Block, DropBlockConfig, Fill, GammaRule, Normalize, Placement, Sharing};

/// What can go wrong in the CLI; printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    DropBlock(#[from] dropblock::Error),
    #[error("{0}")]
    File(String),
    #[error("{0}")]
    Usage(String),
    #[error("writing to stdout: {0}")]
    Stdout(std::io::Error),
}

impl CliError {
    /// Whether stdout was closed under the command (`dropblock bench | head -1`):
    /// not a failure of the command, which then stops quietly.
    pub fn is_closed_stdout(&self) -> bool {
        matches!(self, CliError::Stdout(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

#[derive(Parser)]
#[command(name = "dropblock", version, about = "DropBlock at memory-copy cost: demo and inspection tools")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Forward and backward on a ResNet-sized tensor, on the GPU if there is one; writes a PNG of the masks.
    Demo(demo::DemoArgs),
    /// Apply DropBlock to an N,C,L / N,C,H,W / N,C,D,H,W .npy file (f32, f16 or bf16).
    Apply(apply::ApplyArgs),
    /// Draw the seeds and blocks of a configuration over an image.
    // One map's mask does not depend on sharing, normalisation or fill: their
    // flags are refused (show::run) and left out of the help.
    #[command(mut_arg("share", |a| a.hide(true)), mut_arg("normalize", |a| a.hide(true)))]
    #[command(mut_arg("fill", |a| a.hide(true)))]
    Show(show::ShowArgs),
    /// Time forward, backward or the sampling alone on one shape; the last line is `median_ms=... gbps=...`.
    Bench(bench::BenchArgs),
}

/// The configuration flags shared by every subcommand.
#[derive(Args, Clone)]
pub struct ConfigArgs {
    /// Block size: `7` (on every spatial axis), `7x5` (height x width) or `3x7x7`
    /// (depth x height x width).
    #[arg(long, default_value = "7")]
    block: Block,
    /// Probability that a unit is dropped, in [0, 1].
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true)]
    drop_prob: f64,
    /// Where seeds may fall: valid | anywhere.
    #[arg(long, default_value = "valid")]
    placement: Placement,
    /// How anywhere-placed blocks sit on their seeds: centered (TF SAME; the
    /// default) | centered-right (miguelvr). Only with --placement anywhere.
    #[arg(long)]
    anchor: Option<Anchor>,
    /// γ rule: paper | exact | per-block.
    #[arg(long, default_value = "paper")]
    gamma: GammaRule,
    /// Multiplies γ.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    gamma_scale: f64,
    /// Mask sharing: none | channels | batch | all.
    #[arg(long, default_value = "none")]
    share: Sharing,
    /// Normalisation: global | per-sample | expected | none.
    #[arg(long, default_value = "global")]
    normalize: Normalize,
    /// What dropped units become: zero | noise (standard normal; needs --normalize none).
    #[arg(long, default_value = "zero")]
    fill: Fill,
    /// Philox seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// First Philox counter block (a Generator advances it by 17 per call).
    #[arg(long, default_value_t = 0)]
    offset: u64,
}

impl ConfigArgs {
    fn config(&self) -> Result<DropBlockConfig, CliError> {
        if self.anchor.is_some() && self.placement == Placement::Valid {
            // Valid blocks lie inside the map from their seed: nothing to anchor.
            return Err(CliError::Usage("--anchor applies to --placement anywhere only".into()));
        }
        Ok(DropBlockConfig::builder(self.block, self.drop_prob)
            .placement(self.placement)
            .anchor(self.anchor.unwrap_or(Anchor::Centered))
            .gamma_rule(self.gamma)
            .gamma_scale(self.gamma_scale)
            .sharing(self.share)
            .normalize(self.normalize)
            .fill(self.fill)
            .build()?)
    }

    /// The flags given that do not change one map's mask (`show`'s picture):
    /// sharing, normalisation and fill act across planes or on values only.
    fn mask_neutral_flags(&self) -> Vec<&'static str> {
        [
            (self.share != Sharing::None, "--share"),
            (self.normalize != Normalize::Global, "--normalize"),
            (self.fill != Fill::Zero, "--fill"),
        ]
        .into_iter()
        .filter_map(|(given, flag)| given.then_some(flag))
        .collect()
    }

    fn key(&self) -> Result<dropblock::RngKey, CliError> {
        Ok(dropblock::RngKey::new(self.seed, self.offset)?)
    }
}

pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Apply(a) => apply::run(a),
        Command::Show(a) => show::run(a),
        Command::Bench(a) => bench::run(a),
    }
}

/// An output file written whole or not at all: the data goes to a temporary file
/// beside `path`, which [`Output::commit`] renames onto it, so a failed run leaves
/// no half-written file and never clobbers what was there.
pub struct Output {
    file: tempfile::NamedTempFile,
    path: std::path::PathBuf,
    _pending: Pending,
}

/// The temporary outputs not yet renamed into place. A signal (Ctrl-C, SIGTERM,
/// SIGHUP) ends the process without the destructors that remove them, so a
/// handler, installed before the first one is made, removes them: an interrupted
/// `apply` left a tensor-sized hidden file beside its output.
static PENDING: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

fn pending() -> std::sync::MutexGuard<'static, Vec<std::path::PathBuf>> {
    PENDING.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One temporary output's entry in [`PENDING`], removed when it is dropped (after
/// the rename, or after the file on an error).
struct Pending(std::path::PathBuf);

impl Pending {
    /// A temporary file from `make`, listed before the handler can look: the list
    /// stays locked from before the file exists until it is on it.
    fn create(
        make: impl FnOnce() -> std::io::Result<tempfile::NamedTempFile>,
    ) -> std::io::Result<(tempfile::NamedTempFile, Self)> {
        static HANDLER: std::sync::Once = std::sync::Once::new();
        // Without a handler (one could not be set) a signal leaves the file, as
        // before.
        HANDLER.call_once(remove_pending_on_signal);
        let mut list = pending();
        let file = make()?;
        list.push(file.path().to_path_buf());
        let entry = Self(file.path().to_path_buf());
        Ok((file, entry))
    }
}

/// Removes the pending files, holding the list to the exit: no file is listed, or
/// its entry dropped, after the sweep, and a rename racing it either lands whole
/// or fails. Returns the guard, to be held until the process ends.
fn sweep_pending() -> std::sync::MutexGuard<'static, Vec<std::path::PathBuf>> {
    let list = pending();
    for temp in list.iter() {
        let _ = std::fs::remove_file(temp);
    }
    list
}

/// On SIGINT, SIGTERM and SIGHUP: sweep, then die of the signal, as without a
/// handler, so that the parent sees which (a shell stops a script's loop at a
/// Ctrl-C only when the child died of SIGINT; an exit code of 130 looks like a
/// command that handled it and carried on). The signals the process was started
/// ignoring (`nohup`'s SIGHUP, a background job's SIGINT) stay ignored: such a run
/// goes on as before rather than ending at the signal.
#[cfg(unix)]
fn remove_pending_on_signal() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let ignored = |sig| {
        // SAFETY: with a null new action, sigaction only reads the current one.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN }
    };
    let caught: Vec<_> = [SIGINT, SIGTERM, SIGHUP].into_iter().filter(|&sig| !ignored(sig)).collect();
    let Ok(mut signals) = signal_hook::iterator::Signals::new(&caught) else { return };
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            let _held = sweep_pending();
            die_of(sig);
        }
    });
}

/// Dies of `sig` by its default action; where that action does not end the
/// process, exits `128 + sig`, the shell's code for it. A process that is PID 1 in
/// its namespace (a container's entry point) is not ended by its own signal, and
/// signal-hook's `emulate_default_handler` then aborts, which dumps core or ends
/// in SIGSEGV instead of reporting the signal.
#[cfg(unix)]
fn die_of(sig: libc::c_int) -> ! {
    // SAFETY: plain libc calls on a zeroed, then initialised, action and signal
    // set; a failure of either only leaves the exit below to run.
    unsafe {
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        libc::sigemptyset(&mut default.sa_mask);
        if libc::sigaction(sig, &default, std::ptr::null_mut()) == 0 {
            let mut only: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut only);
            libc::sigaddset(&mut only, sig);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &only, std::ptr::null_mut());
            libc::raise(sig);
        }
        // Not `std::process::exit`: its exit handlers would run on this thread
        // while the main thread may be inside the CUDA driver. The sweep is done
        // and nothing else is left to flush, as after a death by the signal.
        libc::_exit(128 + sig)
    }
}

/// Ctrl-C and its console siblings (the `ctrlc` crate): sweep, then exit 130.
#[cfg(not(unix))]
fn remove_pending_on_signal() {
    let _ = ctrlc::set_handler(|| {
        let _held = sweep_pending();
        std::process::exit(130);
    });
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut list = pending();
        if let Some(i) = list.iter().position(|p| *p == self.0) {
            list.swap_remove(i);
        }
    }
}

impl Output {
    pub fn create(path: &std::path::Path) -> Result<Self, CliError> {
        // Refused now, not when the rename fails after another output was put in place.
        if path.is_dir() {
            return Err(CliError::File(format!("{}: is a directory, not a file to write", path.display())));
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => std::path::Path::new("."),
        };
        let mut builder = tempfile::Builder::new();
        // A file's usual mode under the umask, as a plain write would give it
        // (tempfile's own default is owner-only).
        #[cfg(unix)]
        builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
        let (file, _pending) = Pending::create(|| builder.tempfile_in(dir))
            .map_err(|e| CliError::File(format!("{}: cannot create a file there: {e}", path.display())))?;
        Ok(Self { file, path: path.to_path_buf(), _pending })
    }

    pub fn file(&mut self) -> &mut std::fs::File {
        self.file.as_file_mut()
    }

    pub fn commit(self) -> Result<(), CliError> {
        let Self { file, path, _pending } = self;
        file.persist(&path).map_err(|e| CliError::File(format!("{}: {}", path.display(), e.error)))?;
        Ok(())
    }
}

/// `len` elements from `fill(i)`, in memory reserved first: a typed error, not an
/// abort, when a shape from the command line is more than the host can hold.
pub use dropblock::host_vec;

/// Whether two paths name the same file, whether or not it exists yet.
pub fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    let canonical = |p: &std::path::Path| {
        p.canonicalize().ok().or_else(|| {
            let parent = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => std::path::Path::new("."),
            };
            Some(parent.canonicalize().ok()?.join(p.file_name()?))
        })
    };
    match (canonical(a), canonical(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// `N,C,L`, `N,C,H,W` or `N,C,D,H,W` on the command line.
#[derive(Clone, Debug)]
pub struct ShapeArg(Vec<usize>);

impl std::str::FromStr for ShapeArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let dims: Vec<usize> = s
            .split(',')
            .map(|d| d.trim().parse().map_err(|_| format!("`{d}` in shape `{s}` is not a whole number")))
            .collect::<Result<_, _>>()?;
        if !(3..=5).contains(&dims.len()) {
            return Err(format!("shape `{s}` must be N,C,L or N,C,H,W or N,C,D,H,W"));
        }
        Ok(ShapeArg(dims))
    }
}

impl ShapeArg {
    fn shape(&self) -> Result<dropblock::Shape, CliError> {
        Ok(dropblock::Shape::from_dims(&self.0)?)
    }
}
