//! `s3://bucket/prefix` storage through aws-sdk-s3, for AWS and any S3-compatible server
//! (Garage, MinIO, Ceph RGW, s3s-fs). Request checksums are sent only when the operation
//! requires them: with the SDK's default (`WhenSupported`) streaming bodies go out as
//! `aws-chunked` with a trailing CRC32, which Garage and Ceph reject (see infra notes).

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::primitives::ByteStream;

use super::{StorageUrl, UploadError};

/// Connection settings for S3.
#[derive(Clone, Debug, Default)]
pub struct S3Options {
    /// Endpoint URL, e.g. `http://127.0.0.1:3900`; `None` = AWS.
    pub endpoint: Option<String>,
    /// Region (`us-east-1` when unset).
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), which most self-hosted servers need.
    pub path_style: bool,
    /// Access key id.
    pub access_key: Option<String>,
    /// Secret access key.
    pub secret_key: Option<String>,
}

/// A bucket and key prefix.
#[derive(Clone, Debug)]
pub struct S3Store {
    pub(super) client: Client,
    pub(super) bucket: String,
    prefix: String,
}

impl S3Store {
    /// A client for `bucket` with keys under `prefix`.
    pub fn new(bucket: String, prefix: String, o: &S3Options) -> Result<Self, UploadError> {
        let (Some(ak), Some(sk)) = (&o.access_key, &o.secret_key) else {
            return Err(UploadError::Config(
                "s3: set an access key and secret (KILN_S3_ACCESS_KEY / KILN_S3_SECRET_KEY, \
                 or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
                    .into(),
            ));
        };
        let mut b = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(
                o.region.clone().unwrap_or_else(|| "us-east-1".into()),
            ))
            .credentials_provider(Credentials::new(ak, sk, None, None, "kiln"))
            .force_path_style(o.path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(ep) = &o.endpoint {
            b = b.endpoint_url(ep);
        }
        Ok(Self {
            client: Client::from_conf(b.build()),
            bucket,
            prefix,
        })
    }

    /// The URL, as recorded in results.
    pub fn url(&self) -> StorageUrl {
        StorageUrl::S3 {
            bucket: self.bucket.clone(),
            prefix: self.prefix.clone(),
        }
    }

    /// The client, the bucket and `key` under the prefix (for `multipart`).
    pub(super) fn at(&self, key: &str) -> (&Client, &str, String) {
        (&self.client, &self.bucket, self.full_key(key))
    }

    pub(super) fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    pub(super) async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), UploadError> {
        let full = self.full_key(key);
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .content_type("image/png")
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|e| UploadError::S3 {
                op: "put",
                key: full,
                message: aws_sdk_s3::error::DisplayErrorContext(e).to_string(),
            })?;
        Ok(())
    }

    pub(super) async fn get(&self, key: &str) -> Result<Vec<u8>, UploadError> {
        let full = self.full_key(key);
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| {
                if e.as_service_error().is_some_and(|s| s.is_no_such_key()) {
                    UploadError::NotFound(full.clone())
                } else {
                    UploadError::S3 {
                        op: "get",
                        key: full.clone(),
                        message: aws_sdk_s3::error::DisplayErrorContext(e).to_string(),
                    }
                }
            })?;
        let data = out.body.collect().await.map_err(|e| UploadError::S3 {
            op: "get",
            key: full,
            message: e.to_string(),
        })?;
        Ok(data.into_bytes().to_vec())
    }

    /// Lists every key under the prefix (relative to it); for tests and `kiln fetch`.
    pub async fn list(&self) -> Result<Vec<String>, UploadError> {
        let mut keys = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(if self.prefix.is_empty() {
                String::new()
            } else {
                format!("{}/", self.prefix)
            })
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| UploadError::S3 {
                op: "list",
                key: self.prefix.clone(),
                message: aws_sdk_s3::error::DisplayErrorContext(e).to_string(),
            })?;
            for o in page.contents() {
                if let Some(k) = o.key() {
                    let rel = k.strip_prefix(&format!("{}/", self.prefix)).unwrap_or(k);
                    keys.push(rel.to_string());
                }
            }
        }
        Ok(keys)
    }

    /// Creates the bucket. For tests: kiln never creates a user's bucket.
    #[cfg(feature = "testing")]
    pub async fn create_bucket(&self) -> Result<(), UploadError> {
        self.client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| UploadError::S3 {
                op: "create_bucket",
                key: self.bucket.clone(),
                message: aws_sdk_s3::error::DisplayErrorContext(e).to_string(),
            })?;
        Ok(())
    }
}
