package envoy

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"strconv"
	"sync"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	clusterservice "github.com/envoyproxy/go-control-plane/envoy/service/cluster/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	listenerservice "github.com/envoyproxy/go-control-plane/envoy/service/listener/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	// The typed_config messages the resources use, registered for protojson.
	_ "github.com/cncf/xds/go/xds/type/matcher/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/file/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/filters/cel/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/clusters/dynamic_forward_proxy/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/buffer/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/dynamic_forward_proxy/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/header_mutation/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/set_metadata/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/connection_limit/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/sni_dynamic_forward_proxy/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/matching/common_inputs/network/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/network/dns_resolver/cares/v3"
	_ "google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/vmegress/vmegress/internal/policy"
)

// NodeID is the node name vmegress's Envoy uses and the xDS server serves.
const NodeID = "vmegress"

// xdsCluster is the bootstrap's cluster for the xDS server.
const xdsCluster = "vmegress_xds"

func toProto(m M, msg proto.Message) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	return protojson.Unmarshal(b, msg)
}

// Resources builds the typed listener and clusters for pol.
func Resources(pol *policy.Policy, o Settings) (map[resourcev3.Type][]types.Resource, error) {
	l := &listenerv3.Listener{}
	if err := toProto(Listener(pol, o), l); err != nil {
		return nil, fmt.Errorf("building the Envoy listener: %w", err)
	}
	out := map[resourcev3.Type][]types.Resource{resourcev3.ListenerType: {l}}
	for _, cm := range clusters(o) {
		c := &clusterv3.Cluster{}
		if err := toProto(cm, c); err != nil {
			return nil, fmt.Errorf("building Envoy cluster %v: %w", cm["name"], err)
		}
		out[resourcev3.ClusterType] = append(out[resourcev3.ClusterType], c)
	}
	return out, nil
}

// XDSBootstrap is the bootstrap of an Envoy that takes everything else from
// vmegress's xDS server on the unix socket xdsSocket.
func XDSBootstrap(o Settings, xdsSocket string) M {
	return M{
		"node":  M{"id": NodeID, "cluster": NodeID},
		"admin": admin(o),
		"dynamic_resources": M{
			"ads_config": M{"api_type": "GRPC", "transport_api_version": "V3",
				"grpc_services": []M{{"envoy_grpc": M{"cluster_name": xdsCluster}}}},
			"lds_config": M{"ads": M{}, "resource_api_version": "V3"},
			"cds_config": M{"ads": M{}, "resource_api_version": "V3"},
		},
		"static_resources": M{"clusters": []M{{
			"name": xdsCluster, "type": "STATIC", "connect_timeout": "1s",
			"typed_extension_protocol_options": M{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": typed(
				"envoy.extensions.upstreams.http.v3.HttpProtocolOptions", M{"explicit_http_config": M{"http2_protocol_options": M{}}})},
			"load_assignment": M{"cluster_name": xdsCluster, "endpoints": []M{{"lb_endpoints": []M{{
				"endpoint": M{"address": M{"pipe": M{"path": xdsSocket}}}}}}}},
		}}},
	}
}

// Server serves the compiled policy to Envoy over ADS.
type Server struct {
	cache   cachev3.SnapshotCache
	mu      sync.Mutex
	version int
}

// NewServer returns an xDS server with nothing to serve yet.
func NewServer() *Server {
	return &Server{cache: cachev3.NewSnapshotCache(true, cachev3.IDHash{}, nil)}
}

// Update pushes a new snapshot built from pol (Envoy applies it live).
func (s *Server) Update(ctx context.Context, pol *policy.Policy, o Settings) error {
	res, err := Resources(pol, o)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.version++
	snap, err := cachev3.NewSnapshot(strconv.Itoa(s.version), res)
	if err != nil {
		return fmt.Errorf("building the xDS snapshot: %w", err)
	}
	if err := snap.Consistent(); err != nil {
		return fmt.Errorf("inconsistent xDS snapshot: %w", err)
	}
	return s.cache.SetSnapshot(ctx, NodeID, snap)
}

// Serve answers xDS on ln until ctx ends.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	gs := grpc.NewServer()
	srv := serverv3.NewServer(ctx, s.cache, nil)
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(gs, srv)
	listenerservice.RegisterListenerDiscoveryServiceServer(gs, srv)
	clusterservice.RegisterClusterDiscoveryServiceServer(gs, srv)
	go func() {
		<-ctx.Done()
		gs.Stop()
	}()
	if err := gs.Serve(ln); err != nil && ctx.Err() == nil {
		return fmt.Errorf("serving xDS: %w", err)
	}
	return nil
}
