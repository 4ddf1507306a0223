"""The fleet gateway: the device-facing gRPC API (enrollment over TLS, then mTLS for everything else).

:mod:`.pki` is the fleet CA that issues the gateway's server certificate and every device's client
certificate; the service, servicer and interceptor translate between the wire contract
(``edgefleet_proto.v1.fleet``) and the shared fleet state (:mod:`edgefleet_operator.fleet`).
"""
