fn main() {
    // sqlx::migrate! embeds sql/ at compile time; rebuild when a migration changes.
    println!("cargo:rerun-if-changed=../sql");
}
