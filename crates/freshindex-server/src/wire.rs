//! The JSON shapes of the API (camelCase, after Google Cloud Search's indexing API) and their
//! checks: every request type turns into the store's or engine's request, or into an
//! [`ApiError`] naming the field at fault.
//!
//! The item view ([`Item`]) is shared with the CLI's `queue … --json` output.

use base64::Engine as _;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::{DecodePaddingMode, general_purpose};
use freshindex_core::queue::{
    DEFAULT_POLL_LIMIT, MAX_PAYLOAD_BYTES, MAX_POLL_LIMIT, check_key, check_label,
};
use freshindex_core::schedule::{FlowScheduleStatus, RunInProgress, format_utc_timestamp};
use freshindex_core::{FlowSpec, Interval, ItemStatus, PushType};
use freshindex_engine::IndexRequest;
use freshindex_store::{PollRequest, PushItem, PushKind, QueueEntry};
use serde::{Deserialize, Serialize};

use crate::control::LiveState;
use crate::error::{ApiError, Code};

/// Most items one batch push may carry.
pub const MAX_PUSH_BATCH: usize = 1000;
/// Hits a search returns when the caller does not say.
pub const DEFAULT_SEARCH_LIMIT: usize = 10;
/// Most hits one search may return.
pub const MAX_SEARCH_LIMIT: usize = 100;
/// Entries a list page holds when the caller does not say.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Most entries one list page may hold.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Accepts standard and URL-safe base64, padded or not.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Encodes bytes for the wire (standard alphabet, padded).
pub fn encode_b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Decodes a base64 field (standard or URL-safe alphabet, padding optional); the error names
/// `field`.
pub fn decode_b64(field: &str, value: &str) -> Result<Vec<u8>, ApiError> {
    let standard: String = value
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    LENIENT
        .decode(standard.as_bytes())
        .map_err(|e| ApiError::invalid(format!("{field}: not valid base64: {e}")))
}

/// An opaque page token for the key a page ended at.
pub fn page_token(last_key: &str) -> String {
    general_purpose::URL_SAFE_NO_PAD.encode(last_key.as_bytes())
}

/// The key a page token stands for.
pub fn parse_page_token(token: &str) -> Result<String, ApiError> {
    let bytes = general_purpose::URL_SAFE_NO_PAD
        .decode(token.as_bytes())
        .map_err(|_| ApiError::invalid("pageToken: not a token this server issued"))?;
    String::from_utf8(bytes)
        .map_err(|_| ApiError::invalid("pageToken: not a token this server issued"))
}

/// Parses a status name; the error names `field` and the accepted names.
pub fn parse_status(field: &str, value: &str) -> Result<ItemStatus, ApiError> {
    value.parse().map_err(|_| {
        let names: Vec<&str> = ItemStatus::ALL.iter().map(|s| s.as_str()).collect();
        ApiError::invalid(format!(
            "{field}: unknown status `{value}`; expected one of {}",
            names.join(", ")
        ))
    })
}

/// A limit field: absent → `default`, otherwise `1..=max`.
pub fn check_limit(
    field: &str,
    value: Option<i64>,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    match value {
        None => Ok(default),
        Some(n) if n >= 1 && n <= max as i64 => Ok(n as usize),
        Some(n) => Err(ApiError::invalid(format!(
            "{field}: {n} is out of range; expected 1 to {max}"
        ))),
    }
}

fn label(field: &str, value: &str) -> Result<(), ApiError> {
    check_label(field, value).map_err(ApiError::invalid)
}

/// A lease holder named by a client: a label, and not the holder name of the data
/// directory's own runs (whose leases a client must not be able to release or take over).
pub(crate) fn owner(field: &str, value: &str) -> Result<(), ApiError> {
    label(field, value)?;
    if value == freshindex_engine::RUN_OWNER {
        return Err(ApiError::invalid(format!(
            "{field}: `{value}` is reserved for the runs of this data directory"
        )));
    }
    Ok(())
}

/// An item as the API shows it: its queue entry and payload.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Item {
    /// Item key.
    pub name: String,
    /// Queue status (`NEW_ITEM`, `MODIFIED`, `ACCEPTED`, `SKIPPED`, `ERROR`).
    pub status: &'static str,
    /// Queue label.
    pub queue: String,
    /// Stored content hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_hash: Option<String>,
    /// Stored metadata hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata_hash: Option<String>,
    /// Opaque payload of the last push that carried one (base64).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// Version of the last index (base64).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Whether a live lease holds the entry now.
    pub leased: bool,
    /// Holder of the live lease.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_owner: Option<String>,
    /// End of the live lease (ms since the epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_expire_time_ms: Option<i64>,
    /// Polls since the last successful index.
    pub attempts: u32,
    /// Not offered by poll before this time (ms since the epoch), when in the future.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_time_ms: Option<i64>,
    /// Last error or warning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Item {
    /// The view of `entry` at `now_ms`.
    pub fn from_entry(entry: &QueueEntry, now_ms: i64) -> Item {
        let it = &entry.item;
        let leased = it.is_leased(now_ms);
        Item {
            name: it.key.clone(),
            status: it.status.as_str(),
            queue: it.queue.clone(),
            content_hash: it.content_hash.clone(),
            metadata_hash: it.metadata_hash.clone(),
            payload: entry.payload.as_deref().map(encode_b64),
            version: it.version.as_deref().map(encode_b64),
            leased,
            lease_owner: if leased { it.lease_owner.clone() } else { None },
            lease_expire_time_ms: if leased { it.leased_until_ms } else { None },
            attempts: it.attempts,
            available_time_ms: (it.available_at_ms > now_ms).then_some(it.available_at_ms),
            message: it.message.clone(),
        }
    }
}

/// A page of items (`items:poll`, `GET items`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ItemList {
    /// The items.
    pub items: Vec<Item>,
    /// Token of the next page, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

/// One item's result in a batch push.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum PushResult {
    /// Accepted: the item as it is now.
    Pushed(Item),
    /// Refused; the other items of the batch still applied.
    Refused {
        /// Item key.
        name: String,
        /// `{"code", "message"}`.
        error: serde_json::Value,
    },
}

/// The answer of an `index`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Indexed {
    /// Item key.
    pub name: String,
    /// What the index did.
    #[serde(flatten)]
    pub outcome: freshindex_engine::IndexOutcome,
}

/// One item of a push.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PushItemJson {
    /// Item key (taken from the path in `items/{key}:push`).
    pub name: Option<String>,
    /// `MODIFIED`, `NOT_MODIFIED`, `REPOSITORY_ERROR` or `REQUEUE`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Content hash (instead of a type).
    pub content_hash: Option<String>,
    /// Metadata hash (instead of a type).
    pub metadata_hash: Option<String>,
    /// Opaque payload (base64), at most 8 KiB decoded.
    pub payload: Option<String>,
    /// Queue label.
    pub queue: Option<String>,
}

/// `items:push`: one item or a batch.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PushBody {
    /// One item.
    pub item: Option<PushItemJson>,
    /// A batch (applied in one transaction; each item gets its own result).
    pub items: Option<Vec<PushItemJson>>,
}

/// Checks one pushed item; `field` prefixes the messages (`item`, `items[3]`), `path_key` is
/// the key from the URL, if any.
pub fn push_item(
    field: &str,
    it: PushItemJson,
    path_key: Option<&str>,
) -> Result<PushItem, ApiError> {
    let key = match (path_key, it.name) {
        (Some(p), Some(n)) if p != n => {
            return Err(ApiError::invalid(format!(
                "{field}.name: `{n}` differs from the item named in the path, `{p}`"
            )));
        }
        (Some(p), _) => p.to_string(),
        (None, Some(n)) => n,
        (None, None) => return Err(ApiError::invalid(format!("{field}.name: missing"))),
    };
    check_key(&key).map_err(|e| ApiError::invalid(format!("{field}.{e}")))?;
    let kind = match (it.kind, it.content_hash, it.metadata_hash) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return Err(ApiError::invalid(format!(
                "{field}: give either `type` or `contentHash`/`metadataHash`, not both"
            )));
        }
        (Some(t), None, None) => PushKind::Type(
            t.parse::<PushType>()
                .map_err(|e| ApiError::invalid(format!("{field}.type: {e}")))?,
        ),
        (None, None, None) => {
            return Err(ApiError::invalid(format!(
                "{field}: give a `type` or a `contentHash`/`metadataHash`"
            )));
        }
        (None, content, metadata) => {
            if let Some(h) = &content {
                label(&format!("{field}.contentHash"), h)?;
            }
            if let Some(h) = &metadata {
                label(&format!("{field}.metadataHash"), h)?;
            }
            PushKind::Hashes { content, metadata }
        }
    };
    let payload = match it.payload {
        Some(p) => {
            let bytes = decode_b64(&format!("{field}.payload"), &p)?;
            if bytes.len() > MAX_PAYLOAD_BYTES {
                return Err(ApiError::new(
                    Code::PayloadTooLarge,
                    format!(
                        "{field}.payload: {} bytes decoded, over the limit of {MAX_PAYLOAD_BYTES}",
                        bytes.len()
                    ),
                ));
            }
            Some(bytes)
        }
        None => None,
    };
    if let Some(q) = &it.queue {
        label(&format!("{field}.queue"), q)?;
    }
    Ok(PushItem {
        key,
        kind,
        payload,
        queue: it.queue,
    })
}

/// `items:poll`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PollBody {
    /// Only entries with this label.
    pub queue: Option<String>,
    /// Most entries (default 20, at most 100).
    pub limit: Option<i64>,
    /// Statuses to return (default `ERROR`, `MODIFIED`, `NEW_ITEM`).
    pub status_codes: Option<Vec<String>>,
    /// Lease holder (default: this server's own id).
    pub owner: Option<String>,
}

/// Checks a poll; `default_owner` and `lease_ms` are the server's.
pub fn poll_request(
    body: PollBody,
    default_owner: &str,
    lease_ms: i64,
) -> Result<PollRequest, ApiError> {
    let limit = check_limit("limit", body.limit, DEFAULT_POLL_LIMIT, MAX_POLL_LIMIT)?;
    if let Some(q) = &body.queue {
        label("queue", q)?;
    }
    let statuses = body
        .status_codes
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, s)| parse_status(&format!("statusCodes[{i}]"), s))
        .collect::<Result<Vec<_>, _>>()?;
    let owner = match body.owner {
        Some(o) => {
            owner("owner", &o)?;
            o
        }
        None => default_owner.to_string(),
    };
    Ok(PollRequest {
        queue: body.queue,
        limit,
        statuses,
        owner,
        lease_ms,
    })
}

/// `items:unreserve`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UnreserveBody {
    /// Only entries with this label (all when absent).
    pub queue: Option<String>,
    /// Only leases this holder has (any holder when absent).
    pub owner: Option<String>,
}

/// `deleteQueueItems`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DeleteQueueBody {
    /// The label whose items go.
    pub queue: Option<String>,
}

/// The content of an `index`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContentJson {
    /// The item's text.
    pub text: Option<String>,
    /// Metadata stored with each row (a JSON object).
    pub metadata: Option<serde_json::Value>,
}

/// The item of an `index`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IndexItemJson {
    /// Item key; must equal the key in the path when given.
    pub name: Option<String>,
    /// Opaque version (base64); an index whose version is not newer than the indexed one is
    /// refused.
    pub version: Option<String>,
    /// The content; absent records the index without content (the item keeps its rows).
    pub content: Option<ContentJson>,
    /// Content hash to store.
    pub content_hash: Option<String>,
    /// Metadata hash to store.
    pub metadata_hash: Option<String>,
    /// Label for an item the queue does not hold yet.
    pub queue: Option<String>,
}

/// `items/{key}:index`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IndexBody {
    /// The item.
    pub item: IndexItemJson,
    /// The lease holder the caller is, if it polled the item.
    pub owner: Option<String>,
}

/// Checks an index of the item `key`.
pub fn index_request(key: &str, body: IndexBody) -> Result<IndexRequest, ApiError> {
    check_key(key).map_err(ApiError::invalid)?;
    let it = body.item;
    if let Some(n) = &it.name
        && n != key
    {
        return Err(ApiError::invalid(format!(
            "item.name: `{n}` differs from the item named in the path, `{key}`"
        )));
    }
    let version = it
        .version
        .as_deref()
        .map(|v| decode_b64("item.version", v))
        .transpose()?;
    if version.as_ref().is_some_and(Vec::is_empty) {
        return Err(ApiError::invalid("item.version: must not be empty"));
    }
    let (text, metadata) = match it.content {
        Some(c) => {
            if let Some(m) = &c.metadata
                && !m.is_object()
            {
                return Err(ApiError::invalid(
                    "item.content.metadata: must be a JSON object",
                ));
            }
            (c.text, c.metadata)
        }
        None => (None, None),
    };
    for (f, v) in [
        ("item.contentHash", &it.content_hash),
        ("item.metadataHash", &it.metadata_hash),
        ("item.queue", &it.queue),
    ] {
        if let Some(v) = v {
            label(f, v)?;
        }
    }
    if let Some(o) = &body.owner {
        owner("owner", o)?;
    }
    Ok(IndexRequest {
        key: key.to_string(),
        version,
        text,
        metadata,
        content_hash: it.content_hash,
        metadata_hash: it.metadata_hash,
        queue: it.queue,
        owner: body.owner,
    })
}

/// `search`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SearchBody {
    /// The query text.
    pub query: String,
    /// Most hits (default 10, at most 100).
    pub limit: Option<i64>,
    /// Only rows of items whose name (key) starts with this, such as a folder `guides/`.
    pub source_prefix: Option<String>,
}

/// One search hit.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Hit {
    /// Row key.
    pub key: String,
    /// The item the row came from.
    pub name: String,
    /// Byte range of the chunk in the item.
    pub range: [usize; 2],
    /// Similarity.
    pub score: f32,
    /// The chunk text.
    pub text: String,
    /// Metadata the item was indexed with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
}

/// The label a `deleteQueueItems` names, from the path and/or the body.
pub fn delete_queue_label(path: Option<&str>, body: DeleteQueueBody) -> Result<String, ApiError> {
    let q = match (path, body.queue) {
        (Some(p), Some(b)) if p != b => {
            return Err(ApiError::invalid(format!(
                "queue: `{b}` differs from the queue named in the path, `{p}`"
            )));
        }
        (Some(p), _) => p.to_string(),
        (None, Some(b)) => b,
        (None, None) => return Err(ApiError::invalid("queue: missing")),
    };
    label("queue", &q)?;
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(content: Option<&str>, metadata: Option<&str>) -> PushItemJson {
        PushItemJson {
            name: Some("a/b".into()),
            content_hash: content.map(Into::into),
            metadata_hash: metadata.map(Into::into),
            ..PushItemJson::default()
        }
    }

    #[test]
    fn push_needs_a_type_or_hashes_but_not_both() {
        let both = PushItemJson {
            kind: Some("MODIFIED".into()),
            ..hashes(Some("h"), None)
        };
        let e = push_item("item", both, None).unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
        assert!(e.message.contains("not both"), "{e}");
        let neither = hashes(None, None);
        assert_eq!(
            push_item("item", neither, None).unwrap_err().code,
            Code::InvalidArgument
        );
        let ok = push_item("item", hashes(None, Some("m")), None).unwrap();
        assert_eq!(
            ok.kind,
            PushKind::Hashes {
                content: None,
                metadata: Some("m".into())
            }
        );
        let bad_type = PushItemJson {
            kind: Some("DELETED".into()),
            ..hashes(None, None)
        };
        let e = push_item("items[2]", bad_type, None).unwrap_err();
        assert!(e.message.starts_with("items[2].type:"), "{e}");
    }

    #[test]
    fn payload_limit_is_on_decoded_bytes() {
        let at_limit = PushItemJson {
            payload: Some(encode_b64(&[7u8; MAX_PAYLOAD_BYTES])),
            ..hashes(Some("h"), None)
        };
        assert!(push_item("item", at_limit, None).is_ok());
        let over = PushItemJson {
            payload: Some(encode_b64(&[7u8; MAX_PAYLOAD_BYTES + 1])),
            ..hashes(Some("h"), None)
        };
        assert_eq!(
            push_item("item", over, None).unwrap_err().code,
            Code::PayloadTooLarge
        );
        let garbage = PushItemJson {
            payload: Some("%%%".into()),
            ..hashes(Some("h"), None)
        };
        let e = push_item("item", garbage, None).unwrap_err();
        assert!(e.message.starts_with("item.payload:"), "{e}");
    }

    #[test]
    fn base64_accepts_both_alphabets_and_optional_padding() {
        let bytes = [0xfbu8, 0xff, 0x01];
        for s in ["+/8B", "-_8B"] {
            assert_eq!(decode_b64("v", s).unwrap(), bytes);
        }
        assert_eq!(decode_b64("v", "AQ").unwrap(), [1]);
        assert_eq!(decode_b64("v", "AQ==").unwrap(), [1]);
        assert_eq!(parse_page_token(&page_token("a/b c")).unwrap(), "a/b c");
    }

    #[test]
    fn poll_limits_and_statuses_are_checked() {
        let req = poll_request(PollBody::default(), "http-1", 5).unwrap();
        assert_eq!(
            (req.limit, req.owner.as_str(), req.lease_ms),
            (20, "http-1", 5)
        );
        for bad in [0, 101, -1, 500] {
            let body = PollBody {
                limit: Some(bad),
                ..PollBody::default()
            };
            let e = poll_request(body, "o", 5).unwrap_err();
            assert_eq!(e.code, Code::InvalidArgument);
            assert!(e.message.starts_with("limit:"), "{e}");
        }
        let body = PollBody {
            status_codes: Some(vec!["ERROR".into(), "DONE".into()]),
            ..PollBody::default()
        };
        let e = poll_request(body, "o", 5).unwrap_err();
        assert!(e.message.starts_with("statusCodes[1]:"), "{e}");
    }

    #[test]
    fn index_checks_name_version_and_metadata() {
        let body = |item: IndexItemJson| IndexBody { item, owner: None };
        let other = IndexItemJson {
            name: Some("x".into()),
            ..IndexItemJson::default()
        };
        assert!(index_request("y", body(other)).is_err());
        let meta = IndexItemJson {
            content: Some(ContentJson {
                text: Some("t".into()),
                metadata: Some(serde_json::json!([1])),
            }),
            ..IndexItemJson::default()
        };
        let e = index_request("y", body(meta)).unwrap_err();
        assert!(e.message.starts_with("item.content.metadata"), "{e}");
        let ok = IndexItemJson {
            version: Some(encode_b64(&[0, 0, 1])),
            content: Some(ContentJson {
                text: Some("hello".into()),
                metadata: None,
            }),
            ..IndexItemJson::default()
        };
        let req = index_request("y", body(ok)).unwrap();
        assert_eq!(req.version, Some(vec![0, 0, 1]));
        assert_eq!(req.text.as_deref(), Some("hello"));
    }
}

/// Most item names one `:resetItems` takes.
pub const MAX_RESET_ITEMS: usize = 1000;

/// Most history entries one `GET history` answers (and its default).
pub const MAX_HISTORY_LIMIT: usize = 50;

/// History entries `GET status` includes.
pub const STATUS_HISTORY: usize = 10;

/// `{flow}:reset`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ResetBody {
    /// Drop the memo cache too (the next run computes every embedding again).
    pub drop_cache: Option<bool>,
}

/// `{flow}:resetItems`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ResetItemsBody {
    /// Item keys to reprocess.
    pub names: Vec<String>,
}

/// Checks the names of a `:resetItems`.
pub fn reset_item_names(body: ResetItemsBody) -> Result<Vec<String>, ApiError> {
    if body.names.is_empty() {
        return Err(ApiError::invalid("names: name at least one item"));
    }
    if body.names.len() > MAX_RESET_ITEMS {
        return Err(ApiError::invalid(format!(
            "names: {} names, over the limit of {MAX_RESET_ITEMS}",
            body.names.len()
        )));
    }
    for (i, n) in body.names.iter().enumerate() {
        check_key(n).map_err(|e| ApiError::invalid(format!("names[{i}]: {e}")))?;
    }
    Ok(body.names)
}

/// Turns the body of `PUT /v1/flows/{flow}` into a flow spec: the JSON shape of a `[[flow]]`
/// table of `freshindex.toml`. `name` may be left out; when given it must be the path's.
/// Source paths must be absolute (the server has no config file to resolve them against).
pub fn flow_definition(path_name: &str, body: serde_json::Value) -> Result<FlowSpec, ApiError> {
    let serde_json::Value::Object(mut fields) = body else {
        return Err(ApiError::new(
            Code::InvalidBody,
            "body: a flow definition is a JSON object (the shape of a [[flow]] table)",
        ));
    };
    match fields.get("name") {
        None => {
            fields.insert("name".into(), path_name.into());
        }
        Some(serde_json::Value::String(n)) if n == path_name => {}
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "name: {other} differs from the flow named in the path, `{path_name}`; leave it out or make them equal"
            )));
        }
    }
    let spec: FlowSpec = serde_json::from_value(serde_json::Value::Object(fields))
        .map_err(|e| ApiError::invalid(format!("flow definition: {e}")))?;
    if let Some(files) = spec.files()
        && files.path.is_relative()
    {
        return Err(ApiError::invalid(format!(
            "source.path: `{}` is relative; give an absolute path (a flow defined over the API has no config file to resolve it against)",
            files.path.display()
        )));
    }
    Ok(spec)
}

/// One word for where a flow stands: `running`, `waiting` (for a slot), `backingOff`,
/// `scheduled`, `live`, `liveRestarting`, `disabled` or `onDemand`.
pub fn flow_state(schedule: Option<&FlowScheduleStatus>, live: Option<&LiveState>) -> &'static str {
    let Some(s) = schedule else {
        return "onDemand";
    };
    if s.in_progress.is_some() {
        "running"
    } else if let Some(l) = live {
        if l.state == "restarting" {
            "liveRestarting"
        } else {
            "live"
        }
    } else if s.disabled {
        "disabled"
    } else if s.waiting.is_some() {
        "waiting"
    } else if s.schedule.is_some() && s.consecutive_failures > 0 {
        "backingOff"
    } else if s.schedule.is_some() {
        "scheduled"
    } else {
        "onDemand"
    }
}

fn time_json(ms: Option<i64>) -> serde_json::Value {
    ms.and_then(format_utc_timestamp)
        .map_or(serde_json::Value::Null, serde_json::Value::String)
}

/// The `schedule` object of a flow's status; `None` for a flow without a schedule.
pub fn schedule_status(s: &FlowScheduleStatus) -> Option<serde_json::Value> {
    let schedule = s.schedule.as_ref()?;
    let effective = s
        .effective_interval_ms
        .and_then(|ms| Interval::from_secs(u64::try_from(ms / 1000).ok()?).ok());
    Some(serde_json::json!({
        "interval": schedule.interval().to_string(),
        "startTime": time_json(schedule.start_time_ms().or(s.anchor)),
        "nextRunTime": time_json(s.next_due.filter(|_| !s.disabled)),
        "waitingSince": time_json(s.waiting),
        "consecutiveFailures": s.consecutive_failures,
        "backoff": {
            "active": s.consecutive_failures > 0,
            "effectiveInterval": effective.map(|i| i.to_string()),
        },
    }))
}

/// The `running` object of a flow's status.
pub fn running(r: RunInProgress) -> serde_json::Value {
    serde_json::json!({
        "trigger": r.trigger.as_str(),
        "startedAt": time_json(Some(r.started)),
        "due": time_json(r.due),
    })
}

#[cfg(test)]
mod flow_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_definition_takes_its_name_from_the_path_and_needs_absolute_paths() {
        let spec = flow_definition(
            "docs",
            json!({"source": {"type": "files", "path": "/srv/docs"}, "schedule": {"interval": "PT15M"}}),
        )
        .unwrap();
        assert_eq!(spec.name, "docs");
        assert_eq!(spec.schedule().unwrap().interval().to_string(), "PT15M");
        let e = flow_definition("docs", json!({"name": "other", "source": {"type": "push"}}))
            .unwrap_err();
        assert!(
            e.message
                .contains("differs from the flow named in the path"),
            "{}",
            e.message
        );
        let e = flow_definition("docs", json!({"source": {"type": "files", "path": "docs"}}))
            .unwrap_err();
        assert!(
            e.message.starts_with("source.path: `docs` is relative"),
            "{}",
            e.message
        );
        let e = flow_definition(
            "docs",
            json!({"source": {"type": "push"}, "schedule": {"interval": "PT1M30"}}),
        )
        .unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
        assert!(e.message.contains("PT1M30"), "{}", e.message);
        let e = flow_definition("docs", json!([1])).unwrap_err();
        assert_eq!(e.code, Code::InvalidBody);
        let e =
            flow_definition("docs", json!({"source": {"type": "push"}, "colour": 1})).unwrap_err();
        assert!(e.message.contains("colour"), "{}", e.message);
    }
}
