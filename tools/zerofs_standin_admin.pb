
ÿ
google/protobuf/timestamp.protogoogle.protobuf";
	Timestamp
seconds (Rseconds
nanos (RnanosB…
com.google.protobufBTimestampProtoPZ2google.golang.org/protobuf/types/known/timestamppbø¢GPBªGoogle.Protobuf.WellKnownTypesbproto3
¡	
#zerofs_csi/zerofs_admin/admin.protozerofs.admingoogle/protobuf/timestamp.proto"o
CheckpointInfo
id (	Rid
name (	Rname9

created_at (2.google.protobuf.TimestampR	createdAt"-
CreateCheckpointRequest
name (	Rname"X
CreateCheckpointResponse<

checkpoint (2.zerofs.admin.CheckpointInfoR
checkpoint"
ListCheckpointsRequest"Y
ListCheckpointsResponse>
checkpoints (2.zerofs.admin.CheckpointInfoRcheckpoints"-
DeleteCheckpointRequest
name (	Rname"
DeleteCheckpointResponse".
GetCheckpointInfoRequest
name (	Rname"Y
GetCheckpointInfoResponse<

checkpoint (2.zerofs.admin.CheckpointInfoR
checkpoint"
FlushRequest"
FlushResponse2Ü
AdminServicea
CreateCheckpoint%.zerofs.admin.CreateCheckpointRequest&.zerofs.admin.CreateCheckpointResponse^
ListCheckpoints$.zerofs.admin.ListCheckpointsRequest%.zerofs.admin.ListCheckpointsResponsea
DeleteCheckpoint%.zerofs.admin.DeleteCheckpointRequest&.zerofs.admin.DeleteCheckpointResponsed
GetCheckpointInfo&.zerofs.admin.GetCheckpointInfoRequest'.zerofs.admin.GetCheckpointInfoResponse@
Flush.zerofs.admin.FlushRequest.zerofs.admin.FlushResponsebproto3