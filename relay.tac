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
#   RELAY_ADMIN_PORT                    port or endpoint string, off if unset
#   RELAY_ADMIN_TOKEN_FILE              file of the admin token
#   RELAY_INSPECT_HEADERS               1 or true: keep headers
#   RELAY_PEERS                         host:port,host:port,... (all replicas)
#   RELAY_PEER_SELF                     host:port, from the hostname if unset
#   RELAY_MOVE_WAIT                     Go duration, with RELAY_PEERS only
#   RELAY_PPROF_PORT                    accepted, ignored (Go's)
#   RELAY_TRACE_STACKDRIVER_PROJECT_ID  Google Cloud project: spans to Cloud Trace
#   RELAY_TRACING                       auto|true|false (auto: on with OTEL_EXPORTER_OTLP_ENDPOINT)
#   RELAY_TRACE_SAMPLING_RATIO          0 to 1, traces begun here that are sampled
#
# Logs go where twistd's own options say: stderr with -n, else the
# --logfile (twistd.log by default; --logfile=- is stderr). One more
# variable overrides them:
#
#   RELAY_LOG_FILE                      path: log there (rotated like twistd.log)
#
# A bad value stops twistd with one line naming the variable.
#
# Example: RELAY_PORT=8080 twistd --pidfile= -ny relay.tac

import os
import sys

from twisted.application.service import Application
from twisted.python import usage

from relay.server.tap import Options, makeService, twistd_options


def _flags():
    for name in Options.optParameters:
        variable = "RELAY_" + name[0].upper().replace("-", "_")
        value = os.environ.get(variable)
        if value is not None:
            yield "--%s=%s" % (name[0], value)
    # On/off flags (--inspect_headers): on for 1, true or yes.
    for name in Options.optFlags:
        value = os.environ.get("RELAY_" + name[0].upper().replace("-", "_"), "")
        if value.strip().lower() in ("1", "true", "yes"):
            yield "--" + name[0]


# The same parsing as the command line's, so the same ServerConfig comes of it.
options = Options()
try:
    options.parseOptions(list(_flags()))
except usage.UsageError as e:
    message = str(e)
    for name in Options.optParameters:
        message = message.replace("--%s=" % (name[0],), "RELAY_%s=" % (name[0].upper().replace("-", "_"),))
    raise SystemExit("relay.tac: %s" % (message,))
if os.environ.get("RELAY_LOG_FILE"):
    # makeService hands twistd's own options (.parent) to the log observer.
    options.parent = {"nodaemon": False, "logfile": os.environ["RELAY_LOG_FILE"]}
else:
    options.parent = twistd_options(sys.argv[1:])
application = Application("relay")
makeService(options).setServiceParent(application)
