//! What file mode keeps of the manifest text it applied last: not the text
//! (12 MB at 10 k Services, read again on every change anyway) but its
//! [`Fingerprint`], keyed hashes of its pages and of each document. They
//! tell whether a new text is the same one, and else which EndpointSlice
//! documents it changed ([`Fingerprint::slice_edits`]), as a comparison of
//! both texts byte by byte would: the EndpointSlice shortcut without the
//! old text.

use std::{num::NonZeroU64, sync::LazyLock};

use k8s_openapi::api::discovery::v1 as discovery;

use super::{only_slice, split_documents};
use crate::model;

/// The unit of comparison from either end of the texts: the documents of
/// at most a page on each side of an edit are hashed again, and a page
/// hash costs 8 bytes per 4 KiB of text.
const PAGE: usize = 4096;

/// The key of every hash here, random per process: no text can be written
/// to collide with another (a collision would apply a stale document).
static KEY: LazyLock<ahash::RandomState> = LazyLock::new(ahash::RandomState::new);

fn hash(bytes: &[u8]) -> u64 {
    KEY.hash_one(bytes)
}

/// A text as far as equality goes: its length and a keyed hash of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextHash {
    len: usize,
    hash: u64,
}

/// A text's pages, hashed from its start and from its end (so that an edit
/// changing the length still finds the pages after it unchanged), each
/// hash covering the page's length too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageHashes {
    text: TextHash,
    /// `[0, PAGE)`, `[PAGE, 2 PAGE)`, …: the last one may be shorter.
    from_start: Vec<u64>,
    /// `[len - PAGE, len)`, `[len - 2 PAGE, len - PAGE)`, …: the last one
    /// may be shorter.
    from_end: Vec<u64>,
}

impl PageHashes {
    pub fn of(text: &str) -> PageHashes {
        let bytes = text.as_bytes();
        let from_start: Vec<u64> = bytes.chunks(PAGE).map(hash).collect();
        let from_end = bytes.rchunks(PAGE).map(hash).collect();
        PageHashes {
            text: TextHash {
                len: bytes.len(),
                hash: KEY.hash_one(&from_start),
            },
            from_start,
            from_end,
        }
    }

    pub fn text(&self) -> TextHash {
        self.text
    }
}

/// The identity of an EndpointSlice's metadata namespace and name, as
/// written (no namespace is not `default` here: a whole parse judges that).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SliceName(NonZeroU64);

impl SliceName {
    pub(super) fn of(slice: &discovery::EndpointSlice) -> SliceName {
        let hash = KEY.hash_one((&slice.metadata.namespace, &slice.metadata.name));
        SliceName(NonZeroU64::new(hash).unwrap_or(NonZeroU64::MIN))
    }
}

/// One document of a text ([`split_documents`]' chunks, its `---` line
/// included). 24 bytes: 20 k documents take half a megabyte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DocumentPrint {
    /// Its first byte's offset in the text.
    start: u32,
    /// Its lines, as `str::lines` counts them: a changed count moves the
    /// lines of every document after it.
    lines: u32,
    hash: u64,
    /// The EndpointSlice it holds, when that is all it holds and the whole
    /// parse read it cleanly: the only documents the shortcut may patch.
    /// Never a second object of that name, which the whole parse refuses.
    slice: Option<SliceName>,
}

impl DocumentPrint {
    fn of(start: usize, text: &str, slice: Option<SliceName>) -> DocumentPrint {
        DocumentPrint {
            start: u32::try_from(start).unwrap_or(u32::MAX),
            lines: u32::try_from(text.lines().count()).unwrap_or(u32::MAX),
            hash: hash(text.as_bytes()),
            slice,
        }
    }
}

/// The documents of a text, noted one after the other.
#[derive(Default)]
struct DocumentTable {
    documents: Vec<DocumentPrint>,
    next_start: usize,
}

impl DocumentTable {
    /// The next document: `text` is its chunk of the text.
    fn note(&mut self, text: &str, slice: Option<SliceName>) {
        self.documents
            .push(DocumentPrint::of(self.next_start, text, slice));
        self.next_start += text.len();
    }
}

/// Per document of a text (in [`split_documents`] order), the
/// EndpointSlice it holds when that is all it holds and the whole parse
/// read it cleanly.
#[derive(Debug, Clone, Default)]
pub struct LoneSlices(Vec<Option<SliceName>>);

impl LoneSlices {
    pub(super) fn push(&mut self, slice: Option<SliceName>) {
        self.0.push(slice);
    }
}

/// What the EndpointSlice shortcut keeps of the text last applied in place
/// of the text: [`PageHashes`], and per document its place, lines, hash
/// and lone slice. About 1/20 of the text's size (0.5 MB for 12 MB).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pages: PageHashes,
    /// Where the second document's `---` line ends (its newline), and the
    /// hash of the text up to there: the first document, where YAML's
    /// preamble rules apply, which only a whole parse judges. `None`: no
    /// second document, so no edit is judged without a whole parse.
    head: Option<(usize, u64)>,
    /// In text order; empty if the text is too long (4 GiB) for the offsets.
    documents: Vec<DocumentPrint>,
}

/// The EndpointSlice documents a new text of a manifest changed, when
/// nothing else changed. Only the documents around the pages that differ
/// are split and compared, and the changed ones parsed, so an edit costs
/// about hashing the new text.
#[derive(Debug, PartialEq)]
pub struct SliceEdits {
    /// Per changed document, its slice now (of the same name as before).
    pub slices: Vec<discovery::EndpointSlice>,
    /// A changed document has another number of lines: the locations of
    /// the documents after it moved.
    pub lines_moved: bool,
    /// The new text's, to compare the next one to.
    pub fingerprint: Fingerprint,
}

impl Fingerprint {
    /// The fingerprint of `text`, whose page hashes are `pages` and whose
    /// documents hold `lone_slices` (as the whole parse of `text` noted).
    pub fn new(text: &str, pages: PageHashes, lone_slices: &LoneSlices) -> Fingerprint {
        let mut documents = DocumentTable::default();
        for (index, chunk) in split_documents(text).iter().enumerate() {
            documents.note(chunk.text, lone_slices.0.get(index).copied().flatten());
        }
        Fingerprint::from_table(text, pages, documents)
    }

    fn from_table(text: &str, pages: PageHashes, documents: DocumentTable) -> Fingerprint {
        let documents = match u32::try_from(text.len()) {
            Ok(_) => documents.documents,
            Err(_) => Vec::new(),
        };
        let head = documents.get(1).and_then(|second| {
            let marker_end = text[second.start as usize..].find('\n')? + second.start as usize;
            Some((marker_end, hash(&text.as_bytes()[..=marker_end])))
        });
        Fingerprint {
            pages,
            head,
            documents,
        }
    }

    pub fn text(&self) -> TextHash {
        self.pages.text
    }

    /// The fingerprint of `text`, which is ours with some documents
    /// rewritten in place (the annotations written back): a document whose
    /// text changed is no longer known to hold a lone slice (the shortcut
    /// leaves it to a whole parse), the others keep what they were.
    pub fn rewritten(&self, text: &str) -> Fingerprint {
        let chunks = split_documents(text);
        let same_count = chunks.len() == self.documents.len();
        let mut documents = DocumentTable::default();
        for (index, chunk) in chunks.iter().enumerate() {
            let unchanged = same_count
                && chunk.text.len() == self.document_len(index)
                && hash(chunk.text.as_bytes()) == self.documents[index].hash;
            let slice = self.documents[..]
                .get(index)
                .and_then(|before| before.slice)
                .filter(|_| unchanged);
            documents.note(chunk.text, slice);
        }
        Fingerprint::from_table(text, PageHashes::of(text), documents)
    }

    /// How long document `index` is.
    fn document_len(&self, index: usize) -> usize {
        let end = self
            .documents
            .get(index + 1)
            .map_or(self.pages.text.len, |next| next.start as usize);
        end - self.documents[index].start as usize
    }

    /// [`SliceEdits`] of `new` (its page hashes: `pages`) against the text
    /// of this fingerprint. `None` when anything else may have changed: a
    /// document added, removed or of another kind, a slice renamed, a
    /// changed document that does not read cleanly, or was not a lone
    /// slice read cleanly, an edit in the first document (where YAML's
    /// preamble rules apply): only a whole parse can tell what follows.
    ///
    /// The same documents are compared, the same way, as by a comparison of
    /// both texts: the equal pages at either end bound the span of the
    /// edit, and the documents there are those of the old text whose
    /// `---` line lies outside that span (the same lines in both texts).
    pub fn slice_edits(&self, new: &str, pages: &PageHashes) -> Option<SliceEdits> {
        if pages.text == self.pages.text {
            return Some(SliceEdits {
                slices: Vec::new(),
                lines_moved: false,
                fingerprint: self.clone(),
            });
        }
        let (old_len, new_len) = (self.pages.text.len, new.len());
        if self.documents.is_empty() || u32::try_from(new_len).is_err() {
            return None;
        }
        let shorter = old_len.min(new_len);
        let equal_pages =
            |old: &[u64], new: &[u64]| old.iter().zip(new).take_while(|(a, b)| a == b).count();
        // Bytes both texts begin with (at least).
        let mut prefix =
            (equal_pages(&self.pages.from_start, &pages.from_start) * PAGE).min(shorter);
        let (head_end, head_hash) = self.head?;
        if prefix <= head_end {
            if new_len <= head_end || hash(&new.as_bytes()[..=head_end]) != head_hash {
                return None;
            }
            prefix = head_end + 1;
        }
        // Bytes both texts end with (at least), apart from the prefix.
        let suffix =
            (equal_pages(&self.pages.from_end, &pages.from_end) * PAGE).min(shorter - prefix);

        // From the last document wholly in the prefix (its `---` line is
        // the same in both texts), but never the first one…
        let starting_by = self
            .documents
            .partition_point(|d| d.start as usize <= prefix);
        let wholly_before = match starting_by == self.documents.len() && old_len <= prefix {
            true => starting_by,
            false => starting_by - 1,
        };
        let first = wholly_before.saturating_sub(1).max(1);
        // …to the first one whose `---` line and the newline before it lie
        // in the suffix (also the same in both texts).
        let change_end = old_len - suffix;
        let after =
            first + self.documents[first..].partition_point(|d| d.start as usize <= change_end);
        let span_start = self.documents[first].start as usize;
        let old_span_end = self
            .documents
            .get(after)
            .map_or(old_len, |d| d.start as usize);
        let new_span_end = new_len - (old_len - old_span_end);
        let chunks = split_documents(new.get(span_start..new_span_end)?);
        if chunks.len() != after - first {
            return None;
        }

        let mut slices = Vec::new();
        let mut lines_moved = false;
        let mut documents = Vec::with_capacity(self.documents.len());
        documents.extend_from_slice(&self.documents[..first]);
        let mut start = span_start;
        for (index, chunk) in (first..after).zip(&chunks) {
            let before = self.documents[index];
            let unchanged = chunk.text.len() == self.document_len(index)
                && hash(chunk.text.as_bytes()) == before.hash;
            if unchanged {
                documents.push(DocumentPrint {
                    start: start as u32,
                    ..before
                });
            } else {
                let name = before.slice?;
                let slice = only_slice(chunk)?;
                if SliceName::of(&slice) != name {
                    return None;
                }
                let now = DocumentPrint::of(start, chunk.text, Some(name));
                lines_moved |= now.lines != before.lines;
                documents.push(now);
                slices.push(slice);
            }
            start += chunk.text.len();
        }
        documents.extend(self.documents[after..].iter().map(|d| DocumentPrint {
            start: (d.start as usize - old_span_end + new_span_end) as u32,
            ..*d
        }));
        Some(SliceEdits {
            slices,
            lines_moved,
            fingerprint: Fingerprint {
                pages: pages.clone(),
                head: self.head,
                documents,
            },
        })
    }
}

impl SliceEdits {
    /// The changed slices as the model reads them, to patch into `applied`
    /// (the snapshot applied last). `None` when a slice is not IPv4 now, or
    /// was not in `applied` (not IPv4 before, or refused by the checks):
    /// then what changes takes a whole pass to tell.
    pub fn changes(
        &self,
        applied: &model::Snapshot,
    ) -> Option<Vec<(model::NamespacedName, model::EndpointSlice)>> {
        self.slices
            .iter()
            .map(|slice| {
                let now = model::EndpointSlice::from_k8s(slice).ok().flatten()?;
                let key = model::NamespacedName::new(&now.namespace, &now.name);
                applied
                    .endpoint_slices
                    .contains_key(&key)
                    .then_some((key, now))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{
        Checked,
        manifest::{
            EXAMPLE_CLUSTER, checked_noting_slices, is_marker, parse_documents,
            set_node_annotations,
        },
    };

    fn fingerprint(text: &str) -> Fingerprint {
        let mut lone_slices = LoneSlices::default();
        parse_documents(text, |_, slice| lone_slices.push(slice));
        Fingerprint::new(text, PageHashes::of(text), &lone_slices)
    }

    /// A full pass's parse, as the agent makes it.
    fn checked_with_fingerprint(
        text: &str,
        pages: PageHashes,
        cidr: ipnet::Ipv4Net,
    ) -> (Checked, Fingerprint) {
        let (checked, lone_slices) = checked_noting_slices(text, cidr).unwrap();
        (checked, Fingerprint::new(text, pages, &lone_slices))
    }

    fn slice_edits(old: &str, new: &str) -> Option<SliceEdits> {
        fingerprint(old).slice_edits(new, &PageHashes::of(new))
    }

    fn slice_doc(name: &str, addresses: &[&str]) -> String {
        let mut doc = format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
             labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints:\n"
        );
        for address in addresses {
            doc.push_str(&format!("  - addresses: [{address}]\n"));
        }
        doc
    }

    /// A Service and its slices `web-0`..`web-4`, each with `addresses[i]`.
    fn sliced(addresses: [&[&str]; 5]) -> String {
        let mut text = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
                        spec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}\n"
            .to_owned();
        for (i, addresses) in addresses.iter().enumerate() {
            text.push_str(&slice_doc(&format!("web-{i}"), addresses));
        }
        text
    }

    /// What the edits below start from.
    fn unedited() -> String {
        sliced([
            &["10.0.0.1"],
            &["10.0.0.2"],
            &["10.0.0.3"],
            &[],
            &["10.0.0.5"],
        ])
    }

    fn edited(edits: &SliceEdits) -> Vec<(String, usize)> {
        edits
            .slices
            .iter()
            .map(|slice| {
                let endpoints = model::EndpointSlice::from_k8s(slice)
                    .unwrap()
                    .unwrap()
                    .endpoints;
                (slice.metadata.name.clone().unwrap(), endpoints.len())
            })
            .collect()
    }

    #[test]
    fn slice_edits_find_the_changed_slices_and_nothing_else() {
        let old = unedited();
        let unchanged = slice_edits(&old, &old).unwrap();
        assert!(unchanged.slices.is_empty() && !unchanged.lines_moved);
        assert_eq!(unchanged.fingerprint, fingerprint(&old));

        // An address replaced: one slice, no line moved.
        let new = sliced([
            &["10.0.0.1"],
            &["10.0.0.2"],
            &["10.0.0.9"],
            &[],
            &["10.0.0.5"],
        ]);
        let edits = slice_edits(&old, &new).unwrap();
        assert_eq!(edited(&edits), [("web-2".to_owned(), 1)]);
        assert!(!edits.lines_moved);
        assert_eq!(edits.fingerprint, fingerprint(&new));

        // Two slices apart, one of them growing.
        let new = sliced([
            &["10.0.0.1"],
            &["10.0.0.8"],
            &["10.0.0.3"],
            &[],
            &["10.0.0.5", "10.0.0.6"],
        ]);
        let edits = slice_edits(&old, &new).unwrap();
        assert_eq!(
            edited(&edits),
            [("web-1".to_owned(), 1), ("web-4".to_owned(), 2)]
        );
        assert!(edits.lines_moved);
        assert_eq!(edits.fingerprint, fingerprint(&new));

        // The last document, up to the end of the text.
        let new = sliced([&["10.0.0.1"], &["10.0.0.2"], &["10.0.0.3"], &[], &[]]);
        let edits = slice_edits(&old, &new).unwrap();
        assert_eq!(edited(&edits), [("web-4".to_owned(), 0)]);
        assert_eq!(edits.fingerprint, fingerprint(&new));
    }

    #[test]
    fn slice_edits_refuse_anything_a_whole_parse_must_judge() {
        let old = unedited();
        let refused = |new: &str, why: &str| assert_eq!(slice_edits(&old, new), None, "{why}");
        refused(
            &old.replace("10.96.0.5", "10.96.0.6"),
            "the Service (first document)",
        );
        refused(
            &old.replace("name: web-3", "name: web-9"),
            "a slice renamed",
        );
        refused(
            &old.replace("name: web-3", "name: web-1"),
            "a duplicate name",
        );
        refused(
            &format!("{old}{}", slice_doc("web-5", &[])),
            "a document added",
        );
        let (head, _) = old.split_at(old.find("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-4").unwrap());
        refused(head, "a document removed");
        refused(
            &old.replace("addresses: [10.0.0.3]", "addresses: [10.0.0.3"),
            "a document that is not YAML",
        );
        refused(
            &old.replace(
                "addressType: IPv4\nendpoints:\n  - addresses: [10.0.0.2]",
                "addressType: IPv5\nendpoints:\n  - addresses: [10.0.0.2]",
            ),
            "an invalid slice",
        );
        let service_in_slice = old.replace(
            "kind: EndpointSlice\nmetadata:\n  name: web-2",
            "kind: Service\nmetadata:\n  name: web-2",
        );
        refused(&service_in_slice, "a slice turned into a Service");
        refused(
            &old.replacen("\n---\n", "\n--- # the slices\n", 1),
            "the second document's `---` line (still the first document's end)",
        );
    }

    #[test]
    fn only_the_first_of_two_slices_of_one_name_is_patched() {
        // `web-3` renamed `web-1`: the whole parse reads the first `web-1`
        // and refuses the second.
        let old = unedited().replace("name: web-3", "name: web-1");
        let first = old.replacen("[10.0.0.2]", "[10.0.0.7]", 1);
        assert_eq!(
            edited(&slice_edits(&old, &first).unwrap()),
            [("web-1".to_owned(), 1)]
        );
        let second = old.replacen(
            "name: web-1\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nendpoints:\n---",
            "name: web-1\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nendpoints:\n  - addresses: [10.0.0.7]\n---",
            1,
        );
        assert_ne!(second, old);
        assert_eq!(slice_edits(&old, &second), None);
    }

    #[test]
    fn annotations_written_back_keep_the_other_documents_prints() {
        let set = [("fabedge.io/public-key".to_owned(), "AAAA".to_owned())].into();
        let written = set_node_annotations(EXAMPLE_CLUSTER, "edge-1", &set, &[]).unwrap();
        assert_ne!(written, EXAMPLE_CLUSTER);
        assert_eq!(
            fingerprint(EXAMPLE_CLUSTER).rewritten(&written),
            fingerprint(&written)
        );
    }

    #[test]
    fn an_edit_inside_a_run_of_equal_pages_is_found_once() {
        // Both ends of the texts agree over most of the run: the pages
        // equal from the start and those equal from the end overlap.
        let run = |count| {
            let mut text = unedited();
            let line = "  - addresses: [10.0.0.1]\n";
            let at = text.find(line).unwrap();
            text.insert_str(at, &line.repeat(count));
            text
        };
        let (old, new) = (run(800), run(799));
        let edits = slice_edits(&old, &new).unwrap();
        assert_eq!(edited(&edits), [("web-0".to_owned(), 800)]);
        assert!(edits.lines_moved);
        assert_eq!(edits.fingerprint, fingerprint(&new));
        assert_eq!(
            Some((edits.slices, true)),
            expected_edits(&old, &new),
            "as comparing both texts"
        );
    }

    #[test]
    fn a_document_on_a_page_border_is_compared_from_its_own_line() {
        // `web-2`'s `---` line starts the second page: the first page is
        // equal in the texts below, though `web-2` differs.
        let mut old = unedited();
        let marker = old.find("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-2").unwrap();
        let padding = format!("#{}\n", "x".repeat(PAGE - marker - 2));
        old.insert_str(marker, &padding);
        assert_eq!(old[PAGE..].find("---\n"), Some(0));
        let edited_at_border = |replacement: &str| {
            let mut new = old.clone();
            new.replace_range(PAGE..PAGE + 4, replacement);
            new
        };
        let cases = [
            ("--- # web-2\n", Some(vec![("web-2".to_owned(), 1)])),
            ("", None),
            ("---\n# a comment\n", Some(vec![("web-2".to_owned(), 1)])),
        ];
        for (replacement, expected) in cases {
            let new = edited_at_border(replacement);
            let edits = slice_edits(&old, &new);
            assert_eq!(edits.as_ref().map(edited), expected, "{replacement:?}");
            assert_eq!(
                edits.map(|e| (e.slices, e.lines_moved)),
                expected_edits(&old, &new),
                "{replacement:?}, as comparing both texts"
            );
        }
    }

    /// The shortcut as it was while the agent kept the old text: both texts
    /// compared byte by byte, then the documents between the first and the
    /// last difference. Per changed document its number (from 0, in
    /// [`split_documents`] order) and its slice now; whether lines moved.
    fn slice_edits_by_bytes(
        old: &str,
        new: &str,
    ) -> Option<(Vec<(usize, discovery::EndpointSlice)>, bool)> {
        let (a, b) = (old.as_bytes(), new.as_bytes());
        let prefix = common_prefix(a, b);
        if prefix == a.len() && prefix == b.len() {
            return Some((Vec::new(), false));
        }
        let suffix = common_suffix(a, b, a.len().min(b.len()) - prefix);
        let start = last_marker_before(old, prefix)?;
        let old_end = first_marker_from(old, old.len() - suffix).unwrap_or(old.len());
        let new_end = new.len() - (old.len() - old_end);
        let before = split_documents(&old[start..old_end]);
        let after = split_documents(&new[start..new_end]);
        if before.len() != after.len() {
            return None;
        }
        let earlier = split_documents(&old[..start]).len();
        let mut slices = Vec::new();
        let mut lines_moved = false;
        for (index, (before, after)) in before.iter().zip(&after).enumerate() {
            if before.text == after.text {
                continue;
            }
            let (old_slice, new_slice) = (only_slice(before)?, only_slice(after)?);
            let name = |s: &discovery::EndpointSlice| {
                (s.metadata.namespace.clone(), s.metadata.name.clone())
            };
            if name(&old_slice) != name(&new_slice) {
                return None;
            }
            lines_moved |= before.text.lines().count() != after.text.lines().count();
            slices.push((earlier + index, new_slice));
        }
        Some((slices, lines_moved))
    }

    fn common_prefix(a: &[u8], b: &[u8]) -> usize {
        a.iter().zip(b).take_while(|(a, b)| a == b).count()
    }

    fn common_suffix(a: &[u8], b: &[u8], max: usize) -> usize {
        let equal = a.iter().rev().zip(b.iter().rev());
        equal.take_while(|(a, b)| a == b).count().min(max)
    }

    fn last_marker_before(text: &str, limit: usize) -> Option<usize> {
        let mut search = &text[..limit];
        while let Some(at) = search.rfind("\n---") {
            let line_start = at + 1;
            if let Some(len) = text[line_start..limit].find('\n')
                && is_marker(&text[line_start..line_start + len])
            {
                return Some(line_start);
            }
            search = &text[..at];
        }
        None
    }

    fn first_marker_from(text: &str, from: usize) -> Option<usize> {
        let mut at = from;
        while let Some(found) = text[at..].find("\n---") {
            let line_start = at + found + 1;
            let line = text[line_start..].lines().next().unwrap_or("");
            if is_marker(line) {
                return Some(line_start);
            }
            at = line_start;
        }
        None
    }

    /// What the shortcut must decide: as the byte comparison, except that a
    /// slice given again after a first one of its name (which the whole
    /// parse refuses) is never patched.
    fn expected_edits(old: &str, new: &str) -> Option<(Vec<discovery::EndpointSlice>, bool)> {
        let (slices, lines_moved) = slice_edits_by_bytes(old, new)?;
        let names: Vec<_> = split_documents(old)
            .iter()
            .map(|doc| only_slice(doc).map(|slice| SliceName::of(&slice)))
            .collect();
        let given_before = |index: usize| names[..index].contains(&names[index]);
        if slices.iter().any(|(index, _)| given_before(*index)) {
            return None;
        }
        Some((
            slices.into_iter().map(|(_, slice)| slice).collect(),
            lines_moved,
        ))
    }

    /// splitmix64: the same edits for the same seed.
    struct Random(u64);

    impl Random {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) % n as u64) as usize
        }

        fn address(&mut self) -> String {
            format!(
                "10.{}.{}.{}",
                self.below(4),
                self.below(40),
                self.below(256)
            )
        }
    }

    fn service_doc(service: usize) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{service}}}\n\
             spec: {{clusterIP: 10.96.0.{service}, ports: [{{port: 80}}]}}\n"
        )
    }

    fn random_slice_doc(random: &mut Random, service: usize, name: &str) -> String {
        let mut doc = format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
             labels: {{kubernetes.io/service-name: svc-{service}}}\naddressType: IPv4\nendpoints:\n"
        );
        for _ in 0..random.below(10) {
            doc.push_str(&format!("  - addresses: [{}]\n", random.address()));
        }
        doc
    }

    /// 20 Services of 1 to 4 slices each: about 6 pages.
    fn random_manifest(random: &mut Random) -> String {
        let mut text = String::new();
        for service in 0..20 {
            if service > 0 {
                text.push_str("---\n");
            }
            text.push_str(&service_doc(service));
            for slice in 0..1 + random.below(4) {
                let name = format!("svc-{service}-{slice}");
                text.push_str(&random_slice_doc(random, service, &name));
            }
        }
        text
    }

    /// One of the edits an operator or a controller makes, at random.
    fn random_edit(random: &mut Random, text: &str) -> String {
        let mut docs: Vec<String> = split_documents(text)
            .iter()
            .map(|doc| doc.text.to_owned())
            .collect();
        let slices: Vec<usize> = (0..docs.len())
            .filter(|&i| docs[i].contains("kind: EndpointSlice"))
            .collect();
        let slice = slices[random.below(slices.len())];
        let address_lines: Vec<usize> = docs[slice]
            .match_indices("  - addresses: [")
            .map(|(at, _)| at)
            .collect();
        let line_at = |random: &mut Random| match address_lines.len() {
            0 => None,
            n => Some(address_lines[random.below(n)]),
        };
        match random.below(18) {
            // One digit of an address: the same length.
            0 => {
                if let Some(at) = line_at(random) {
                    let digit = docs[slice][at..].find(']').unwrap() + at - 1;
                    let new = char::from(b'0' + random.below(10) as u8).to_string();
                    docs[slice].replace_range(digit..digit + 1, &new);
                }
            }
            // An address of another length, maybe.
            1 => {
                if let Some(at) = line_at(random) {
                    let end = docs[slice][at..].find('\n').unwrap() + at + 1;
                    let line = format!("  - addresses: [{}]\n", random.address());
                    docs[slice].replace_range(at..end, &line);
                }
            }
            2 => docs[slice].push_str(&format!("  - addresses: [{}]\n", random.address())),
            3 => {
                if let Some(at) = line_at(random) {
                    let end = docs[slice][at..].find('\n').unwrap() + at + 1;
                    docs[slice].replace_range(at..end, "");
                }
            }
            // A document added, or removed.
            4 => {
                let at = 1 + random.below(docs.len());
                let name = format!("added-{}", random.below(1000));
                docs.insert(at, random_slice_doc(random, 0, &name));
            }
            5 => {
                docs.remove(1 + random.below(docs.len() - 1));
            }
            // A slice renamed, maybe as another one.
            6 => {
                let other = slices[random.below(slices.len())];
                let name_of = |doc: &str| {
                    let at = doc.find("  name: ").unwrap() + 8;
                    doc[at..at + doc[at..].find('\n').unwrap()].to_owned()
                };
                let (from, to) = (name_of(&docs[slice]), name_of(&docs[other]));
                let to = if from == to {
                    format!("{to}-renamed")
                } else {
                    to
                };
                docs[slice] =
                    docs[slice].replace(&format!("name: {from}\n"), &format!("name: {to}\n"));
            }
            // A Service, the first document or another one.
            7 => {
                let at = random.below(docs.len());
                docs[at] = docs[at].replace("ports: [{port: 80}]", "ports: [{port: 81}]");
            }
            8 => docs[0].insert_str(0, "# edited\n"),
            // Right at a page's border, counted from either end.
            9 | 10 => {
                let mut joined = docs.concat();
                let pages = joined.len() / PAGE;
                let border = match random.below(2) {
                    0 => PAGE * (1 + random.below(pages)),
                    _ => joined.len() - PAGE * (1 + random.below(pages)),
                };
                // The address digit nearest to the border.
                let is_address_digit = |at: &usize| {
                    let line_start = joined[..*at].rfind('\n').map_or(0, |n| n + 1);
                    joined.as_bytes()[*at].is_ascii_digit()
                        && joined[line_start..].starts_with("  - addresses: [")
                };
                let near = (0..64)
                    .flat_map(|distance| [border - distance, border + distance])
                    .filter(|&at| at < joined.len())
                    .find(is_address_digit);
                if let Some(at) = near {
                    let new = char::from(b'0' + random.below(10) as u8).to_string();
                    joined.replace_range(at..at + 1, &new);
                }
                return joined;
            }
            // The same text written again.
            11 => {}
            // A `---` line: commented, or gone (two documents in one).
            12 => docs[slice].replace_range(0..3, "--- # edited"),
            13 => docs[slice].replace_range(0..4, ""),
            14 => docs[slice] = docs[slice].replacen(']', "", 1),
            15 => {
                let (from, to) = match random.below(2) {
                    0 => ("addressType: IPv4", "addressType: IPv6"),
                    _ => ("addressType: IPv6", "addressType: IPv4"),
                };
                docs[slice] = docs[slice].replace(from, to);
            }
            16 => docs[slice] = docs[slice].replace("addressType:", "# a comment\naddressType:"),
            // Two edits at once.
            _ => {
                let once = random_edit(random, text);
                return random_edit(random, &once);
            }
        }
        docs.concat()
    }

    #[test]
    fn slice_edits_decide_as_comparing_both_texts_and_patch_what_a_whole_parse_reads() {
        let cidr = "10.96.0.0/12".parse().unwrap();
        let mut shortcuts = 0;
        for seed in 0..6 {
            let mut random = Random(seed);
            let mut text = random_manifest(&mut random);
            let (mut applied, mut print) =
                checked_with_fingerprint(&text, PageHashes::of(&text), cidr);
            for step in 0..80 {
                let new = random_edit(&mut random, &text);
                let context = format!("seed {seed}, step {step}");
                let pages = PageHashes::of(&new);
                let edits = print.slice_edits(&new, &pages);
                assert_eq!(
                    edits.as_ref().map(|e| (e.slices.clone(), e.lines_moved)),
                    expected_edits(&text, &new),
                    "{context}"
                );
                let (whole, whole_print) = checked_with_fingerprint(&new, pages, cidr);
                // As the agent patches (run.rs): not when a problem's line moved.
                let patch = edits
                    .filter(|e| !e.lines_moved || applied.problems.is_empty())
                    .and_then(|e| Some((e.changes(&applied.snapshot)?, e.fingerprint)));
                if let Some((changes, patched_print)) = patch {
                    for (key, slice) in changes {
                        applied
                            .snapshot
                            .endpoint_slices
                            .insert(key, std::sync::Arc::new(slice));
                    }
                    assert_eq!(applied.snapshot, whole.snapshot, "{context}");
                    assert_eq!(applied.problems, whole.problems, "{context}");
                    assert_eq!(patched_print, whole_print, "{context}");
                    shortcuts += 1;
                }
                (applied, print, text) = (whole, whole_print, new);
            }
        }
        assert!(shortcuts >= 40, "{shortcuts} shortcuts taken");
    }

    #[test]
    fn a_document_costs_24_bytes_of_fingerprint() {
        assert_eq!(std::mem::size_of::<DocumentPrint>(), 24);
    }
}
