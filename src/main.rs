//! The `totango-destination` binary: the command line of `totango_destination::cli`.

// The system allocator took a fifth of the CPU under load (perf); mimalloc is
// faster for the many small, short-lived allocations of requests.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    totango_destination::cli::main()
}
