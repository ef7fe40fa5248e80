#!/bin/sh
# Prepare a broker for VPP_BROKER_CREDENTIALS=password_file: the base password file (the
# service's and, optionally, one gateway's login) and the ACL file with the topic root. Device
# logins are NOT made here: the broker agent (`vpp broker-agent`, a sidecar of the broker) writes
# them from PostgreSQL into the password file, after these base lines, and reloads the broker.
#
# The password file itself is only seeded when missing (the broker refuses to start without one);
# the agent rewrites it whole. Re-running this script resets the base logins (their passwords are
# whatever the environment says now) and leaves device logins to the agent's next write.
# Needs only mosquitto_passwd (in the eclipse-mosquitto image): runs as an init container.
#
# Environment:
#   DATA_DIR              default /mosquitto/data   (shared by the broker and its agent)
#   ACL_TEMPLATE          default the `acl` file beside this script
#   VPP_SERVICE_USER      default vpp-service       (VPP_MQTT_URL of vpp serve / vpp ingest)
#   VPP_SERVICE_PASSWORD  required
#   VPP_GATEWAY_USER      default vpp-gateway       (OEM gateway / fleet simulator)
#   VPP_GATEWAY_PASSWORD  optional: without it no gateway login is made
#   VPP_TOPIC_ROOT        default vpp/v1            (must equal the service's VPP_TOPIC_ROOT)
set -eu
DATA_DIR="${DATA_DIR:-/mosquitto/data}"
ACL_TEMPLATE="${ACL_TEMPLATE:-$(dirname "$0")/acl}"
SERVICE_USER="${VPP_SERVICE_USER:-vpp-service}"
SERVICE_PASSWORD="${VPP_SERVICE_PASSWORD:?set VPP_SERVICE_PASSWORD}"
GATEWAY_USER="${VPP_GATEWAY_USER:-vpp-gateway}"
GATEWAY_PASSWORD="${VPP_GATEWAY_PASSWORD:-}"
ROOT="${VPP_TOPIC_ROOT:-vpp/v1}"

mkdir -p "$DATA_DIR"
BASE="$DATA_DIR/passwd.base"
: >"$BASE.tmp"
# -b: password on the command line (batch mode); the default hash of 2.0.11 is $7$ (PBKDF2),
# right for these few long-lived service logins.
mosquitto_passwd -b "$BASE.tmp" "$SERVICE_USER" "$SERVICE_PASSWORD"
if [ -n "$GATEWAY_PASSWORD" ]; then
    mosquitto_passwd -b "$BASE.tmp" "$GATEWAY_USER" "$GATEWAY_PASSWORD"
fi
mv "$BASE.tmp" "$BASE"
if [ ! -s "$DATA_DIR/passwd" ]; then
    cp "$BASE" "$DATA_DIR/passwd"
fi
# The ACL file names the service and gateway users: rename them along with the topic root.
sed -e "s#vpp/v1/#$ROOT/#g" \
    -e "s#^user vpp-service\$#user $SERVICE_USER#" \
    -e "s#^user vpp-gateway\$#user $GATEWAY_USER#" \
    "$ACL_TEMPLATE" >"$DATA_DIR/acl.tmp"
mv "$DATA_DIR/acl.tmp" "$DATA_DIR/acl"
# The dynsec plugin's file: the deny list of devices being revoked, empty to begin with (no
# admin: the service administers it through the ACL file's $CONTROL grant).
DYNSEC_FILE="${DYNSEC_FILE:-$DATA_DIR/dynamic-security.json}"
if [ ! -s "$DYNSEC_FILE" ]; then
    cat >"$DYNSEC_FILE" <<'JSON'
{"defaultACLAccess": {"publishClientSend": false, "publishClientReceive": true,
 "subscribe": false, "unsubscribe": true}, "clients": [], "groups": [], "roles": []}
JSON
fi
chmod 0644 "$DATA_DIR/passwd" "$DATA_DIR/passwd.base" "$DATA_DIR/acl"
# Run as root (compose): hand the files to the broker's user, which the broker (saving dynsec)
# and the agent (uid 1883, replacing passwd) run as. BROKER_UID: 1883 in eclipse-mosquitto.
if [ "$(id -u)" = "0" ]; then
    chown "${BROKER_UID:-1883}:${BROKER_UID:-1883}" "$DATA_DIR" "$DATA_DIR/passwd" \
        "$DATA_DIR/passwd.base" "$DATA_DIR/acl" "$DYNSEC_FILE"
fi
echo "init-passwd: base logins and ACL in $DATA_DIR"
