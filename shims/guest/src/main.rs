//! `isola-guest`: the /init of isola's guest initramfs. All logic lives in the library.

fn main() {
    isola_guest::init::run();
}
