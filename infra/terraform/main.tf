# The bucket for moe-ray checkpoints and MLflow artifacts, and the IAM role the Ray nodes use
# to reach it (no keys on the nodes). Apply with:
#   cd infra/terraform && terraform init && terraform apply -var bucket=my-moe-ray-bucket
# Old checkpoints: moe-ray keeps `checkpoint.keep` per run itself (`moe-ray checkpoints --prune`).
# Unfinished multipart uploads of interrupted checkpoint writes are aborted after a day. An age
# rule cannot tell an abandoned run from a finished one, so expiring runs/ is opt-in:
# `-var checkpoint_days=30` deletes EVERYTHING under runs/ older than 30 days, final
# checkpoints of finished runs included; copy the models you keep to another prefix first.

terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = { source = "hashicorp/aws", version = ">= 5.0" }
  }
}

variable "region" {
  type    = string
  default = "us-west-2"
}

variable "bucket" {
  type        = string
  description = "bucket for checkpoints (runs/) and MLflow artifacts (mlflow/)"
}

variable "checkpoint_days" {
  type        = number
  default     = null
  description = "expire objects under runs/ after this many days (null: never)"
}

provider "aws" {
  region = var.region
}

resource "aws_s3_bucket" "moe_ray" {
  bucket = var.bucket
}

resource "aws_s3_bucket_public_access_block" "moe_ray" {
  bucket                  = aws_s3_bucket.moe_ray.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_server_side_encryption_configuration" "moe_ray" {
  bucket = aws_s3_bucket.moe_ray.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "aws:kms"
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "moe_ray" {
  bucket = aws_s3_bucket.moe_ray.id
  dynamic "rule" {
    for_each = var.checkpoint_days == null ? [] : [var.checkpoint_days]
    content {
      id     = "expire-old-checkpoints"
      status = "Enabled"
      filter {
        prefix = "runs/"
      }
      expiration {
        days = rule.value
      }
    }
  }
  rule {
    id     = "abort-interrupted-uploads"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}

# The Ray nodes' role (cluster/aws.yaml: IamInstanceProfile moe-ray-node).
data "aws_iam_policy_document" "assume_ec2" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "node" {
  name               = "moe-ray-node"
  assume_role_policy = data.aws_iam_policy_document.assume_ec2.json
}

data "aws_iam_policy_document" "bucket_rw" {
  statement {
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.moe_ray.arn]
  }
  statement {
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${aws_s3_bucket.moe_ray.arn}/*"]
  }
}

resource "aws_iam_role_policy" "bucket_rw" {
  name   = "moe-ray-bucket"
  role   = aws_iam_role.node.id
  policy = data.aws_iam_policy_document.bucket_rw.json
}

resource "aws_iam_instance_profile" "node" {
  name = "moe-ray-node"
  role = aws_iam_role.node.name
}

output "checkpoint_storage" {
  value = "s3://${aws_s3_bucket.moe_ray.bucket}/runs"
}

output "mlflow_artifacts" {
  value = "s3://${aws_s3_bucket.moe_ray.bucket}/mlflow"
}
