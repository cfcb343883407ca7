# twistd -y relay.tac: the relay server as a .tac application.
#
# Configured by environment variables, each named after the twistd relay
# flag it stands for (RELAY_ and the flag's name in capitals, dashes as
# underscores; see `twistd relay --help` for what each does and its
# default, which relay/config.py's ServerConfig holds):
#
#   RELAY_PORT                          port or endpoint string
#   RELAY_BLOCK_SIZE                    bytes
#   RELAY_INACTIVE_REQUEST_TIMEOUT      Go duration
#   RELAY_INACTIVE_BACKEND_TIMEOUT      Go duration
#   RELAY_MAX_REQUEST_BODY              bytes
#   RELAY_BUSY_POLL_US                  microseconds, 0 is off
#   RELAY_MAX_BUFFERED_BODIES           bytes
#   RELAY_CLIENT_TOKENS                 file of relay-client tokens
#   RELAY_USER_TOKENS                   file of user tokens
#   RELAY_TRUSTED_USER_HEADER           header name
#   RELAY_MAX_PENDING_PER_BACKEND       requests
#   RELAY_MAX_BACKENDS                  backend names
#   RELAY_MAX_HEADERS                   header lines
#   RELAY_MAX_HEADER_BYTES              bytes
#   RELAY_HEADER_TIMEOUT                Go duration
#   RELAY_TCP_KEEPALIVE_INTERVAL        Go duration, 0 is off
#   RELAY_DEAD_CONNECTION_TIMEOUT       Go duration, 0 is the system's
#   RELAY_DRAIN_GRACE                   Go duration, 0 is none
#   RELAY_LOG_LEVEL                     debug|info|warn|error
#   RELAY_LOG_FORMAT                    json|text
#   RELAY_HTTP1_ENGINE                  auto|httptools|twisted (auto: httptools on CPython)
#   RELAY_ADMIN_PORT                    port or endpoint string, off if unset
#   RELAY_ADMIN_TOKEN_FILE              file of the admin token
#   RELAY_PEERS                         host:port,host:port,... (all replicas)
#   RELAY_PEER_SELF                     host:port, from the hostname if unset
#   RELAY_MOVE_WAIT                     Go duration, with RELAY_PEERS only
#   RELAY_PPROF_PORT                    accepted, ignored (Go's)
#   RELAY_TRACE_STACKDRIVER_PROJECT_ID  Google Cloud project: spans to Cloud Trace
#   RELAY_TRACING                       auto|true|false (auto: on with OTEL_EXPORTER_OTLP_ENDPOINT)
#   RELAY_TRACE_SAMPLING_RATIO          0 to 1, traces begun here that are sampled
#   RELAY_INSPECT_HEADERS               1, true or yes: keep headers
#
# Logs go where twistd's own options say: stderr with -n, else the
# --logfile (twistd.log by default; --logfile=- is stderr). One more
# variable overrides them:
#
#   RELAY_LOG_FILE                      path: log there (rotated like twistd.log)
#
# A bad value, an on/off value that is neither, or a RELAY_* variable not
# listed here stops twistd with one line naming the variable. Kubernetes'
# service links for a Service named relay (RELAY_SERVICE_HOST,
# RELAY_PORT=tcp://10.0.0.1:80, ...) are ignored; set RELAY_PORT in the
# container's env to choose the port.
#
# Example: RELAY_PORT=8080 twistd --pidfile= -ny relay.tac

import os
import sys

from twisted.application.service import Application

from relay.server.tac import tac_service

application = Application("relay")
tac_service(os.environ, sys.argv[1:]).setServiceParent(application)
