"""The requests the S3 blob store makes (lightmail.storage.s3blobs), through boto3.

Every method blocks: they run on the store's worker threads, never on the reactor.
Each upload carries the SHA-256 of what it sends (``x-amz-checksum-sha256``, per
part for a multipart upload) and the service refuses it when the octets that
arrived do not match (400 BadDigest); where the answer states a checksum, it is
compared with ours too.  Errors come out as :class:`S3Error` (the service said no,
or could not be reached), whose text never holds the credentials.

Why boto3 in threads rather than aiobotocore: LightMail runs on Twisted's default
reactor, and aiobotocore would need the asyncio reactor under the whole server; the
store's work already has the shape of the filesystem store's (blocking calls on a
bounded pool, results as Deferreds).  docs/benchmarks.rst has the cost per PUT.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

from lightmail.config import S3Config
from lightmail.storage.interfaces import BlobMissing, StorageError

__all__ = ["S3Client", "S3Error", "S3Refused"]


class S3Error(StorageError):
    """A request to the S3 service failed: it could not be reached, or said no."""


class S3Refused(S3Error):
    """The service refused an upload: what arrived does not match its SHA-256."""


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class S3Client:
    """One boto3 client (thread-safe, as botocore's clients are) for one bucket."""

    def __init__(self, config: S3Config, max_connections: int) -> None:
        import boto3
        from botocore.config import Config as BotoConfig
        self.bucket = config.bucket
        verify: bool | str = config.tls_verify
        if config.tls_verify and config.ca_file is not None:
            verify = str(config.ca_file)
        self._client = boto3.session.Session().client(
            "s3", endpoint_url=config.endpoint or None, region_name=config.region,
            aws_access_key_id=config.access_key,
            aws_secret_access_key=config.secret_key, verify=verify,
            config=BotoConfig(
                s3={"addressing_style": config.addressing},
                connect_timeout=config.timeout, read_timeout=config.timeout,
                retries={"total_max_attempts": config.retries + 1, "mode": "standard"},
                max_pool_connections=max_connections,
                # The checksums are ours (SHA-256, the blob's id), sent as headers;
                # botocore adds no CRC32 of its own, nor streams a trailer.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required"))
        from botocore.exceptions import BotoCoreError, ClientError
        self._errors: tuple[type[Exception], ...] = (BotoCoreError, ClientError)

    def _fail(self, exc: Exception, what: str) -> S3Error:
        code = _code(exc)
        if code in ("BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"):
            return S3Refused(f"the S3 service refused {what}: the octets it received do "
                             f"not match their SHA-256 ({code})")
        return S3Error(f"S3 {what}: {exc}")

    def _call(self, what: str, method: str, **kwargs: Any) -> Any:
        try:
            return getattr(self._client, method)(Bucket=self.bucket, **kwargs)
        except self._errors as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                raise BlobMissing(f"{what}: no such object") from None
            raise self._fail(exc, what) from None

    # -- uploads -------------------------------------------------------------------------

    def put(self, key: str, body: bytes, sha256: bytes) -> None:
        """One PUT of the whole object, checked by the service against ``sha256``."""
        answer = self._call(f"PUT {key}", "put_object", Key=key, Body=body,
                            ContentLength=len(body), ChecksumAlgorithm="SHA256",
                            ChecksumSHA256=b64(sha256))
        stated = answer.get("ChecksumSHA256")
        if stated is not None and stated != b64(sha256):
            raise S3Refused(f"the S3 service stored {key} with the SHA-256 {stated}, "
                            f"not {b64(sha256)}")

    def put_parts(self, key: str, parts: Iterable[bytes]) -> None:
        """A multipart upload of ``parts`` (each but the last at least 5 MiB), each
        checked by the service against its SHA-256; aborted should any step fail."""
        upload = self._call(f"multipart upload of {key}", "create_multipart_upload",
                            Key=key, ChecksumAlgorithm="SHA256")["UploadId"]
        try:
            done = []
            digests = b""
            for number, part in enumerate(parts, 1):
                digest = hashlib.sha256(part).digest()
                digests += digest
                answer = self._call(f"part {number} of {key}", "upload_part", Key=key,
                                    UploadId=upload, PartNumber=number, Body=part,
                                    ContentLength=len(part), ChecksumAlgorithm="SHA256",
                                    ChecksumSHA256=b64(digest))
                done.append({"ETag": answer["ETag"], "PartNumber": number,
                             "ChecksumSHA256": b64(digest)})
            answer = self._call(f"completion of {key}", "complete_multipart_upload",
                                Key=key, UploadId=upload, MultipartUpload={"Parts": done})
        except BaseException:
            try:
                self._call(f"abort of {key}", "abort_multipart_upload", Key=key,
                           UploadId=upload)
            except Exception:
                pass        # sweep aborts what is left, after the grace period
            raise
        # The object's checksum of a multipart upload is the SHA-256 of its parts'.
        expected = f"{b64(hashlib.sha256(digests).digest())}-{len(done)}"
        stated = answer.get("ChecksumSHA256")
        if stated is not None and stated != expected:
            raise S3Refused(f"the S3 service completed {key} with the checksum {stated}, "
                            f"not {expected}")

    # -- reads ---------------------------------------------------------------------------

    def get(self, key: str, offset: int = 0, length: int = -1) -> bytes:
        """The object's octets (``length`` of them from ``offset``; all with -1)."""
        if length == 0:
            return b""
        kwargs: dict[str, Any] = {}
        if offset or length >= 0:
            end = "" if length < 0 else str(offset + length - 1)
            kwargs["Range"] = f"bytes={offset}-{end}"
        try:
            answer = self._call(f"GET {key}", "get_object", Key=key, **kwargs)
        except S3Error as exc:
            if "InvalidRange" in str(exc):      # from past the end: nothing
                return b""
            raise
        try:
            return bytes(answer["Body"].read())
        except self._errors as exc:
            raise self._fail(exc, f"GET {key}") from None
        finally:
            answer["Body"].close()

    def open(self, key: str) -> Any:
        """The object's content as a stream (``read(n)``, ``close()``)."""
        return self._call(f"GET {key}", "get_object", Key=key)["Body"]

    def modified(self, key: str) -> float | None:
        """When the object was last written (a Unix time), or None if there is none."""
        try:
            answer = self._call(f"HEAD {key}", "head_object", Key=key)
        except BlobMissing:
            return None
        stamp: datetime.datetime = answer["LastModified"]
        return stamp.timestamp()

    def delete(self, key: str) -> None:
        self._call(f"DELETE {key}", "delete_object", Key=key)

    def list_before(self, prefix: str, before: float) -> Iterator[str]:
        """The keys under ``prefix`` last written before ``before`` (a Unix time)."""
        token: dict[str, str] = {}
        while True:
            page = self._call(f"listing of {prefix or '/'}", "list_objects_v2",
                              Prefix=prefix, **token)
            for item in page.get("Contents", ()):
                if item["LastModified"].timestamp() < before:
                    yield item["Key"]
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def abort_uploads_before(self, prefix: str, before: float) -> int:
        """Abort the multipart uploads under ``prefix`` begun before ``before`` (left
        by a process that died midway); how many."""
        aborted = 0
        marker: dict[str, str] = {}
        while True:
            page = self._call("listing of multipart uploads", "list_multipart_uploads",
                              Prefix=prefix, **marker)
            for upload in page.get("Uploads", ()):
                if upload["Initiated"].timestamp() < before:
                    self._call(f"abort of {upload['Key']}", "abort_multipart_upload",
                               Key=upload["Key"], UploadId=upload["UploadId"])
                    aborted += 1
            if not page.get("IsTruncated"):
                return aborted
            marker = {"KeyMarker": page["NextKeyMarker"],
                      "UploadIdMarker": page["NextUploadIdMarker"]}
