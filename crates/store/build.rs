//! `sqlx::migrate!` embeds the migration files at compile time; without this, adding a file
//! would not rebuild the crate.

fn main() {
    println!("cargo:rerun-if-changed=../../sql/postgres");
    println!("cargo:rerun-if-changed=../../sql/sqlite");
}
