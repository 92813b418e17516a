//! `isola-guest`: the /init of isola's guest initramfs. All logic lives in the library.

fn main() {
    // Run as a plain command (not PID 1) it only reports its version: the agent's exec
    // path uses that as a program every guest has.
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("isola-guest {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    isola_guest::init::run();
}
