//! What the benches share.

/// The number after `name` on the command line, or `default`.
pub fn flag(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|arg| arg == name)
        .and_then(|index| args.get(index + 1))
        .map_or(default, |text| text.parse().expect("a number"))
}
