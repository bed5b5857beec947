//! Parsing human-friendly sizes and durations on the command line.

/// `256`, `256M`, `256MiB`, `1G`, `1GiB` -> MiB.
pub fn parse_mib(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let (num, mult) = if let Some(n) = lower.strip_suffix("gib").or(lower.strip_suffix('g')) {
        (n, 1024)
    } else if let Some(n) = lower.strip_suffix("mib").or(lower.strip_suffix('m')) {
        (n, 1)
    } else {
        (lower.as_str(), 1)
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| {
            format!("{s:?} is not a size: use MiB as a number, or a suffix M or G (e.g. 256M, 1G)")
        })
}

/// `NAME:SIZE` for an extra disk, e.g. `data:1G`.
pub fn parse_disk(s: &str) -> Result<(String, u64), String> {
    let (name, size) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not a disk: use NAME:SIZE, e.g. data:1G"))?;
    Ok((name.to_string(), parse_mib(size)?))
}

/// `KEY=VALUE`.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// A host trait name, as the control plane accepts it.
pub fn parse_trait(s: &str) -> Result<String, String> {
    if flotilla_control::placement::valid_trait(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a trait name: 1-63 characters of a-z, 0-9, '-', '.' and ':'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_mib("256"), Ok(256));
        assert_eq!(parse_mib("512M"), Ok(512));
        assert_eq!(parse_mib("1G"), Ok(1024));
        assert_eq!(parse_mib("2GiB"), Ok(2048));
        assert!(parse_mib("lots").unwrap_err().contains("e.g. 256M"));
        assert_eq!(parse_disk("data:1G"), Ok(("data".into(), 1024)));
        assert!(parse_disk("data").is_err());
        assert_eq!(parse_key_value("a=b=c"), Ok(("a".into(), "b=c".into())));
    }

    #[test]
    fn trait_names_follow_the_control_planes_rule() {
        assert_eq!(parse_trait("gpu").as_deref(), Ok("gpu"));
        assert_eq!(parse_trait("cpu-avx2").as_deref(), Ok("cpu-avx2"));
        assert!(parse_trait("GPU").unwrap_err().contains("not a trait name"));
        assert!(parse_trait("ssd_fast").is_err());
    }
}
