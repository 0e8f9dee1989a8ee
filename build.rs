//! Rebuilds when a migration is added or changed: `sqlx::migrate!` embeds the migrations at
//! compile time, and cargo does not otherwise notice new files in those directories.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
