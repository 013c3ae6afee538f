//! Broker URLs in messages: the one rule the worker and the command line share for hiding the
//! password, so neither can print part of it.

/// `amqp://user:secret@host/` becomes `amqp://user:***@host/`.
///
/// The host part starts after the *last* `@`, and the user name ends at the *first* `:` of the
/// credentials (a user name cannot hold an unescaped `:`), so a password holding `@` or `:`
/// is hidden whole. A URL without credentials, or with a user but no password, is returned as
/// it is.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((credentials, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match credentials.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn a_password_holding_at_signs_and_colons_is_hidden_whole() {
        assert_eq!(
            redact_url("amqps://app:p@ss:w@rd@mq.example:5671/prod"),
            "amqps://app:***@mq.example:5671/prod"
        );
        assert_eq!(
            redact_url("amqp://guest:secret@broker:5672/%2f"),
            "amqp://guest:***@broker:5672/%2f"
        );
    }

    #[test]
    fn urls_without_a_password_are_left_alone() {
        assert_eq!(redact_url("amqp://127.0.0.1/%2f"), "amqp://127.0.0.1/%2f");
        assert_eq!(redact_url("amqp://broker"), "amqp://broker");
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
