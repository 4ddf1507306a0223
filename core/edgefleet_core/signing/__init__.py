"""TUF signing for bundles: keys, the repository that writes signed metadata, the client that verifies it.

python-tuf does the cryptography and every verification rule; see :mod:`.repository` (write),
:mod:`.client` (read) and :mod:`.fetcher` (the store as the client's transport).
"""

from edgefleet_core.signing.client import TufClient
from edgefleet_core.signing.fetcher import StoreFetcher
from edgefleet_core.signing.keys import KeySet
from edgefleet_core.signing.repository import ExpiryPolicy, RepositoryVersions, TufRepository

__all__ = ["ExpiryPolicy", "KeySet", "RepositoryVersions", "StoreFetcher", "TufClient", "TufRepository"]
