//! One contract, three backends: a local folder, process memory, and a real S3 server (SeaweedFS on loopback).

use bytes::Bytes;
use darkroom_storage::testing::SeaweedFs;
use darkroom_storage::{Storage, StorageConfig, StorageError, object_key, part_key};
use futures::StreamExt;

fn chunks(data: &[u8], size: usize) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + use<> {
    let v: Vec<Result<Bytes, std::io::Error>> = data.chunks(size).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    futures::stream::iter(v)
}

async fn collect(s: &Storage, key: &str, range: Option<(u64, Option<u64>)>) -> Result<Vec<u8>, StorageError> {
    let r = s.get(key, range).await?;
    let mut out = vec![];
    let mut st = r.stream;
    while let Some(c) = st.next().await {
        out.extend_from_slice(&c?);
    }
    Ok(out)
}

async fn contract(s: Storage) {
    // Small and large (multipart on the backend) streamed puts.
    let small: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    let w = s.put_stream(&object_key("small"), chunks(&small, 100), 1 << 20).await.unwrap();
    assert_eq!(w.size, 1000);
    assert_eq!(collect(&s, &object_key("small"), None).await.unwrap(), small);
    let big: Vec<u8> = (0..(20u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    let w = s.put_stream(&object_key("big"), chunks(&big, 1 << 20), 64 << 20).await.unwrap();
    assert_eq!(w.size, big.len() as u64);
    assert_eq!(s.head(&object_key("big")).await.unwrap().size, big.len() as u64);
    assert_eq!(collect(&s, &object_key("big"), None).await.unwrap(), big);

    // Ranges.
    assert_eq!(collect(&s, &object_key("small"), Some((10, Some(20)))).await.unwrap(), small[10..20]);
    assert_eq!(collect(&s, &object_key("small"), Some((990, None))).await.unwrap(), small[990..]);
    let r = s.get(&object_key("big"), Some((5 << 20, Some((5 << 20) + 7)))).await.unwrap();
    assert_eq!((r.size, r.range), (big.len() as u64, (5 << 20)..((5 << 20) + 7)));

    // Over the limit: refused, and nothing is left behind.
    let e = s.put_stream(&object_key("too-big"), chunks(&big, 1 << 20), 10 << 20).await.unwrap_err();
    assert!(matches!(e, StorageError::TooLarge(_)), "{e}");
    assert!(matches!(s.head(&object_key("too-big")).await, Err(StorageError::NotFound)));
    let e = s.put_stream(&object_key("too-big2"), chunks(&small, 100), 999).await.unwrap_err();
    assert!(matches!(e, StorageError::TooLarge(999)));
    assert!(matches!(s.head(&object_key("too-big2")).await, Err(StorageError::NotFound)));

    // Parts as temporary objects, listed in order, joined, then removed.
    let p1 = s.put_bytes(&part_key("up", 2), Bytes::from_static(b"world")).await.unwrap();
    let p0 = s.put_bytes(&part_key("up", 1), Bytes::from(big[..6 << 20].to_vec())).await.unwrap();
    let parts = s.parts("up").await.unwrap();
    assert_eq!(parts.iter().map(|(n, _)| *n).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(parts[0].1.etag, p0.etag);
    assert_eq!(parts[1].1.etag, p1.etag);
    assert!(!p0.etag.is_empty());
    let joined = s.concat(&[part_key("up", 1), part_key("up", 2)], &object_key("joined")).await.unwrap();
    assert_eq!(joined.size, (6 << 20) + 5);
    let got = collect(&s, &object_key("joined"), None).await.unwrap();
    assert_eq!(&got[..6 << 20], &big[..6 << 20]);
    assert_eq!(&got[6 << 20..], b"world");
    assert_eq!(s.delete_prefix("parts/up").await.unwrap(), 2);
    assert!(s.parts("up").await.unwrap().is_empty());

    // Deletes; a missing object is fine to delete and not found to read.
    s.delete(&object_key("small")).await.unwrap();
    s.delete(&object_key("small")).await.unwrap();
    assert!(matches!(collect(&s, &object_key("small"), None).await, Err(StorageError::NotFound)));
    assert!(matches!(s.read_all(&object_key("big"), 10).await, Err(StorageError::TooLarge(10))));
    assert_eq!(s.read_all(&object_key("joined"), 64 << 20).await.unwrap().len(), (6 << 20) + 5);
}

#[tokio::test]
async fn local_folder_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(&StorageConfig::Local(dir.path().join("objects"))).unwrap();
    assert!(s.local_root().is_some());
    contract(s).await;
}

#[tokio::test]
async fn memory_meets_the_contract() {
    contract(Storage::open(&StorageConfig::Memory).unwrap()).await;
}

#[tokio::test]
async fn s3_on_seaweedfs_meets_the_contract() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let weed = tokio::task::spawn_blocking(SeaweedFs::start).await.unwrap();
    let cfg = StorageConfig::parse(&weed.storage_url()).unwrap();
    let s = Storage::open(&cfg).unwrap();
    contract(s).await;
    // Wrong credentials are refused by the server, not silently accepted.
    let bad = StorageConfig::parse(&weed.storage_url().replace("darkroom-test-secret", "wrong")).unwrap();
    let s = Storage::open(&bad).unwrap();
    assert!(matches!(s.put_bytes("objects/x", Bytes::from_static(b"x")).await, Err(StorageError::Backend(_))));
}

#[test]
fn storage_urls_parse() {
    assert_eq!(StorageConfig::parse("/var/x").unwrap(), StorageConfig::Local("/var/x".into()));
    assert_eq!(StorageConfig::parse("file:///var/x").unwrap(), StorageConfig::Local("/var/x".into()));
    match StorageConfig::parse("s3://b?endpoint=http://127.0.0.1:1&region=r&access_key_id=a").unwrap() {
        StorageConfig::S3 { url, endpoint, region, options } => {
            assert_eq!(url, "s3://b");
            assert_eq!(endpoint.as_deref(), Some("http://127.0.0.1:1"));
            assert_eq!(region.as_deref(), Some("r"));
            assert_eq!(options, vec![("access_key_id".to_string(), "a".to_string())]);
        }
        other => panic!("{other:?}"),
    }
    assert!(StorageConfig::parse("s3://").is_err());
    assert!(StorageConfig::parse("gs://x").is_err());
}
