/*
 * nitro_names.c: the names of nitro's enumerated codes, the one place they
 * are spelled. Python reads these tables (nitro/_datapath.py) for typed
 * errors, `nitro status` and Prometheus label values, so a code added in C
 * gets its name here and nowhere else. Indexed by the code; every entry is
 * set (_datapath.py checks at import).
 */
#include "nitro.h"
#include "nitro_net.h"
#include "nitro_tunnel.h"

const char *const nitro_fault_names[NITRO_FAULT_KINDS] = {
    [NITRO_FAULT_NONE] = "none",
    [NITRO_FAULT_AVAIL_IDX] = "avail_idx",
    [NITRO_FAULT_DESC_INDEX] = "desc_index",
    [NITRO_FAULT_DESC_ADDR] = "desc_addr",
    [NITRO_FAULT_DESC_LOOP] = "desc_loop",
    [NITRO_FAULT_INDIRECT] = "indirect",
    [NITRO_FAULT_DESC_ORDER] = "desc_order",
    [NITRO_FAULT_REQUEST] = "request",
    [NITRO_FAULT_INFLIGHT] = "inflight",
    [NITRO_FAULT_MEMORY] = "memory",
    [NITRO_FAULT_EVENTFD] = "eventfd",
};

const char *const nitro_blk_op_names[NITRO_BLK_OPS] = {
    [NITRO_BLK_OP_IN] = "in",
    [NITRO_BLK_OP_OUT] = "out",
    [NITRO_BLK_OP_FLUSH] = "flush",
    [NITRO_BLK_OP_GET_ID] = "get_id",
    [NITRO_BLK_OP_DISCARD] = "discard",
    [NITRO_BLK_OP_WRITE_ZEROES] = "write_zeroes",
    [NITRO_BLK_OP_UNSUPPORTED] = "unsupported",
};

const char *const nitro_net_drop_names[NITRO_NET_DROP_KINDS] = {
    [NITRO_NET_DROP_NO_RX_BUFFER] = "no_rx_buffer",
    [NITRO_NET_DROP_SPOOFED_SOURCE] = "spoofed_source",
    [NITRO_NET_DROP_UNKNOWN_DESTINATION] = "unknown_destination",
    [NITRO_NET_DROP_BAD_HEADER] = "bad_header",
    [NITRO_NET_DROP_MTU] = "mtu",
    [NITRO_NET_DROP_PUNT_OVERFLOW] = "punt_overflow",
    [NITRO_NET_DROP_TO_GATEWAY] = "to_gateway",
};

const char *const nitro_tunnel_drop_names[NITRO_TUNNEL_DROP_KINDS] = {
    [NITRO_TUNNEL_DROP_MALFORMED] = "malformed",
    [NITRO_TUNNEL_DROP_UNKNOWN_SPI] = "unknown_spi",
    [NITRO_TUNNEL_DROP_REPLAY] = "replay",
    [NITRO_TUNNEL_DROP_AUTH] = "auth",
    [NITRO_TUNNEL_DROP_WRONG_VNI] = "wrong_vni",
    [NITRO_TUNNEL_DROP_MTU] = "mtu",
    [NITRO_TUNNEL_DROP_NO_SA] = "no_sa",
    [NITRO_TUNNEL_DROP_POLICY] = "policy",
    [NITRO_TUNNEL_DROP_UNKNOWN_PEER] = "unknown_peer",
};

const char *const nitro_underlay_drop_names[NITRO_UNDERLAY_DROP_KINDS] = {
    [NITRO_UNDERLAY_DROP_SPOOFED_SOURCE] = "spoofed_source",
    [NITRO_UNDERLAY_DROP_UNKNOWN_DESTINATION] = "unknown_destination",
    [NITRO_UNDERLAY_DROP_BAD_FRAME] = "bad_frame",
    [NITRO_UNDERLAY_DROP_MTU] = "mtu",
    [NITRO_UNDERLAY_DROP_SOCKET_FULL] = "socket_full",
    [NITRO_UNDERLAY_DROP_SEND_ERROR] = "send_error",
    [NITRO_UNDERLAY_DROP_NO_UNDERLAY] = "no_underlay",
};
