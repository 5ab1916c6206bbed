// mimalloc keeps freed memory for reuse: per-image buffers of hundreds of KB otherwise go
// back to the kernel and fault in again (12% of the preprocessing benchmark).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(kiln::cli::main());
}
