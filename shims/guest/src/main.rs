//! `isola-guest`: the /init of isola's guest initramfs. All logic lives in the library.

fn main() {
    // The shim code running in the guest re-executes /init for its helpers, as the
    // native shim does with its own binary.
    let args: Vec<String> = std::env::args().collect();
    #[cfg(feature = "shim")]
    match args.get(1).map(String::as_str) {
        Some("pause") => isola_shim_native::pause::main(&args[2..]),
        Some("libct") => isola_shim_native::forker::helper_main(&args[2..]),
        Some(isola_guest::handoff::SUBCOMMAND) => isola_guest::init::run_handed_off(&args[2..]),
        _ => {}
    }
    // Run as a plain command (not PID 1) it only reports its version: the agent's exec
    // path uses that as a program every guest has.
    if args.get(1).map(String::as_str) == Some("--version") {
        println!("isola-guest {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    isola_guest::init::run();
}
