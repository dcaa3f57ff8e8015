//! Secrets typed by an operator: a password, a key bundle's passphrase.

use std::io::{BufRead, IsTerminal};

use anyhow::{bail, Context};

/// A secret from the terminal, asked a second time when `confirm`, or else the first line of
/// stdin: a script that pipes it twice, as for the prompt, must not get a secret that ends in
/// a newline (and so could never be typed again). `what` names it in errors.
pub fn read_secret(prompt: &str, confirm: bool, what: &str) -> anyhow::Result<String> {
    if std::io::stdin().is_terminal() {
        let a = rpassword::prompt_password(prompt)?;
        if confirm && a != rpassword::prompt_password("repeat it: ")? {
            bail!("the {what}s differ");
        }
        return Ok(a);
    }
    let mut s = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut s)
        .with_context(|| format!("read the {what} from stdin"))?;
    Ok(s.trim_end_matches(['\n', '\r']).to_string())
}
